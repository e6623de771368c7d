"""A built-in, deterministic, procedurally generated image-classification set.

Ten classes told apart by SHAPE or TEXTURE, never by colour: foreground and
background colours, position, size, stripe frequency and phase, and pixel noise
are random per image. A small network learns it in minutes on a CPU, so the
README's main command needs no download. Image i of a split is a pure function
of (seed, split, i): the same on every machine and every run.
"""

from __future__ import annotations

import math

import tensorflow as tf

CLASS_NAMES = (
    "disk", "square", "ring", "horizontal_stripes", "vertical_stripes",
    "checkerboard", "diagonal_stripes", "cross", "triangle", "diamond",
)
SPLIT_OFFSETS = {"train": 0, "validation": 1_000_003, "test": 2_000_003}


def _mask(label, x, y, p):
    """Foreground mask in [0, 1] for class `label` on the coordinate grid x, y in [-1, 1]."""
    cx, cy, r, freq, phase = p[0], p[1], p[2], p[3], p[4]
    dx, dy = x - cx, y - cy
    dist = tf.sqrt(dx * dx + dy * dy)
    two_pi = 2.0 * math.pi
    masks = [
        dist < r,
        tf.maximum(tf.abs(dx), tf.abs(dy)) < 0.8 * r,
        tf.abs(dist - r) < 0.12,
        tf.sin(two_pi * freq * y / 2 + phase) > 0,
        tf.sin(two_pi * freq * x / 2 + phase) > 0,
        tf.sin(math.pi * freq * x / 2 + phase) * tf.sin(math.pi * freq * y / 2 + phase) > 0,
        tf.sin(two_pi * freq * (x + y) / 2.828 + phase) > 0,
        ((tf.abs(dx) < 0.12) & (tf.abs(dy) < r)) | ((tf.abs(dy) < 0.12) & (tf.abs(dx) < r)),
        (dy <= 0.5 * r) & (dy >= -r) & (tf.abs(dx) <= 0.6 * (dy + r)),
        tf.abs(dx) + tf.abs(dy) < r,
    ]
    return tf.cast(tf.gather(tf.stack(masks), label), tf.float32)


def synthetic_example(index, seed: int, split: str, size: int, num_classes: int):
    """(uint8 image [size, size, 3], int32 label) for example `index` of a split."""
    index = tf.cast(index, tf.int32)
    label = index % num_classes
    base = tf.stack([tf.constant(seed, tf.int32), index + SPLIT_OFFSETS[split]])
    u = tf.random.stateless_uniform([11], base)
    # centre, radius, stripe frequency (cycles over the image), phase
    params = tf.stack([
        (u[0] - 0.5) * 0.6, (u[1] - 0.5) * 0.6, 0.35 + 0.3 * u[2],
        2.0 + 3.0 * u[3], u[4] * 2.0 * math.pi,
    ])
    coords = (tf.range(size, dtype=tf.float32) + 0.5) / size * 2.0 - 1.0
    y, x = tf.meshgrid(coords, coords, indexing="ij")
    mask = _mask(label, x, y, params)[..., None]
    fg = u[5:8] * 255.0
    # background far from foreground in every channel: the shape is always visible
    bg = tf.math.floormod(fg + 96.0 + 64.0 * u[8:11], 256.0)
    noise = tf.random.stateless_normal([size, size, 3], base + 1, stddev=12.0)
    image = mask * fg + (1.0 - mask) * bg + noise
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label


def synthetic_dataset(
    split: str = "train", num_examples: int = 10_000, size: int = 64,
    num_classes: int = 10, seed: int = 0, shuffle_seed: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """Finite dataset of (uint8 image, int32 label); labels cycle through the classes.

    `input_context` keeps this input pipeline's share of the example ids;
    `shuffle_seed` shuffles the ids (cheaply, before any image is drawn).
    """
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"synthetic split must be one of {sorted(SPLIT_OFFSETS)}, got {split!r}")
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"synthetic num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}")
    ids = tf.data.Dataset.range(num_examples)
    if input_context is not None and input_context.num_input_pipelines > 1:
        ids = ids.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle_seed is not None:
        ids = ids.shuffle(num_examples, seed=shuffle_seed, reshuffle_each_iteration=True)
    return ids.map(
        lambda i: synthetic_example(i, seed, split, size, num_classes),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
