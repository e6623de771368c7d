"""tf.data pipelines for training and evaluation, one per input pipeline of a strategy.

Corrupt or undecodable encoded images are filtered out before decoding and
counted in `DecodeStats.skipped` (the loop logs the running count); anything
the cheap check misses is dropped by `ignore_errors` rather than crash a run.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from advprop_tf.data.autoaugment import autoaugment
from advprop_tf.data.randaugment import randaugment
from advprop_tf.data.preprocessing import is_decodable_image, preprocess_eval, preprocess_train
from advprop_tf.data.sources import Source, SourceError
from advprop_tf.domains import CLEAN_IMAGES, VIEWS

AUGMENTATIONS = ("none", "randaugment", "autoaugment", "keras_cv_randaugment")


class DecodeStats:
    """How many images could not be decoded (a host-side variable the loop checkpoints).

    Training counts each undecodable FILE once: such images are dropped (a
    failed header check or a decode error alike), and the gaps they leave in
    the element indices are counted only within the first pass over the split,
    in which every file appears exactly once; later epochs do not count the
    same file again, and a resumed run goes on from the checkpointed count.
    """

    def __init__(self):
        with tf.init_scope():
            self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_images")

    def gap_counter(self, first_pass_size):
        """A tf.data scan function: state = the last index seen; counts dropped indices < first_pass_size."""
        end = tf.constant(-1 if first_pass_size is None else first_pass_size, tf.int64)

        def count(previous, element):
            index = element[-1]
            first, last = previous + 1, index  # dropped: first .. last - 1
            if first_pass_size is not None:
                first, last = tf.minimum(first, end), tf.minimum(last, end)
            dropped = tf.maximum(last - first, 0)
            with tf.control_dependencies([self.skipped.assign_add(dropped)]):
                return tf.identity(index), element[:-1]

        return count

    def keep(self, data, label):
        ok = is_decodable_image(data)
        with tf.control_dependencies([self.skipped.assign_add(tf.cast(tf.logical_not(ok), tf.int64))]):
            return tf.identity(ok)


def check_readable(source: Source, split: str = "train"):
    """Fail early, with a clear error, when a source has no image that can be decoded."""
    ds = source.dataset(split)
    if source.encoded:
        ds = ds.filter(lambda data, label: is_decodable_image(data))
    try:
        data, _ = next(iter(ds.take(1)))
    except StopIteration:
        raise SourceError(
            f"{source.kind} source {source.location!r} has no readable image in its {split!r} split"
        ) from None
    if source.encoded:
        try:
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError as e:
            raise SourceError(
                f"{source.kind} source {source.location!r}: its first image cannot be decoded ({e.message})"
            ) from None


def make_keras_cv_randaugment(num_layers: int, magnitude: float):
    """keras-cv's RandAugment on [0, 255] pixels (NOT the authors'); its magnitude tops out at our 10."""
    if magnitude > 10:
        raise SourceError(f"keras-cv's RandAugment caps the magnitude at 10, got {magnitude:g}; "
                          "the authors' RandAugment (randaugment) takes any magnitude")
    import keras_cv

    return keras_cv.layers.RandAugment(
        value_range=(0, 255), augmentations_per_image=num_layers,
        magnitude=float(magnitude) / 10.0,
    )


def train_dataset(source: Source, size: int, batch_size: int, *, augment: str = "none",
                  randaugment_layers: int = 2, randaugment_magnitude: float = 10.0,
                  views: tuple = (), seed: int | None = None, shuffle_buffer: int = 10_000,
                  stats: DecodeStats | None = None, skip_examples: int = 0, crop_min_area: float = 0.08,
                  input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Endless batches of (pixels, labels); pixels is a dict {CLEAN_IMAGES: ..., view: ...} when views are asked for.

    `batch_size` is per input pipeline (per replica under a strategy). The
    order, crops and flips are a function of `seed` (random when None), the
    input pipeline's id (so that workers and TPU hosts draw differently) and
    use only stateless random ops, so the iterator can be checkpointed
    (keras-cv's RandAugment is stateful: with it the iterator cannot; our
    AutoAugment and RandAugment are seeded per element and keep it stateless).
    `skip_examples` resumes where a run stopped when the iterator could not be
    saved: that many elements of THIS pipeline (all of its local replicas'
    batches) are skipped before decoding, and the indices of the rest (hence
    crops and flips) are those of an uninterrupted run.
    """
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0] % (2**31 - 1))
    for view in views:
        if view not in VIEWS:
            raise SourceError(f"unknown input view {view!r}; valid views: {VIEWS}")
    if augment not in AUGMENTATIONS:
        raise SourceError(f"unknown augmentation {augment!r}; valid: {', '.join(AUGMENTATIONS)}")
    pipeline = 0 if input_context is None else input_context.input_pipeline_id
    ds = source.dataset("train", input_context, shuffle_seed=seed)
    stats = stats or DecodeStats()
    if not source.shuffles_index:  # records: a buffer of them
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat()
    ds = ds.enumerate()
    if skip_examples:
        ds = ds.skip(skip_examples)
    keras_cv_layer = (make_keras_cv_randaugment(randaugment_layers, randaugment_magnitude)
                      if augment == "keras_cv_randaugment" else None)

    def augmented(image, kind, element_seed, stream):
        # each use draws from a stream of its own, independent of the crop's
        salt = tf.constant(0x5EED + 7919 * stream, tf.int32)
        own_seed = tf.stack([element_seed[0], tf.bitwise.bitwise_xor(element_seed[1], salt)])
        if kind == "randaugment":
            return randaugment(image, own_seed, randaugment_layers, randaugment_magnitude)
        if kind == "autoaugment":
            return autoaugment(image, own_seed)
        if kind == "keras_cv_randaugment":
            return keras_cv_layer(image)
        return image

    def prepare(index, example):
        data, label = example
        if source.encoded:  # an undecodable image fails here and is dropped below, as a decode error is
            check = tf.debugging.Assert(is_decodable_image(data), ["undecodable image"])
            with tf.control_dependencies([check]):
                data = tf.identity(data)
        # (seed, pipeline, index): the n-th image of every worker or TPU host gets its own crop and draws
        element_seed = tf.cast(tf.stack([tf.cast(seed, tf.int64) + 1_000_003 * pipeline, index]) % (2**31 - 1), tf.int32)
        image = preprocess_train(data, size, element_seed, min_area=crop_min_area)
        clean = augmented(image, augment, element_seed, 0)
        if not views:
            return clean, label, index
        out = {CLEAN_IMAGES: clean}
        for stream, view in enumerate(views, start=1):
            out[view] = augmented(image, view, element_seed, stream)
        return out, label, index

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    ds = ds.scan(tf.constant(skip_examples - 1, tf.int64), stats.gap_counter(first_pass_size(source, input_context)))
    # The skipped-image counter is state outside the pipeline: saving the
    # iterator ignores it (the loop checkpoints the counter itself).
    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    ds = ds.with_options(options)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def first_pass_size(source: Source, input_context=None):
    """Elements in one pass over this pipeline's share of the training split (None: unknown)."""
    total = source.num_examples("train")
    if total is None:
        return None
    if input_context is None or input_context.num_input_pipelines == 1:
        return total
    pipelines, index = input_context.num_input_pipelines, input_context.input_pipeline_id
    return (total - index + pipelines - 1) // pipelines  # Dataset.shard(pipelines, index)


def eval_dataset(source: Source, size: int, batch_size: int, split: str = "validation",
                 stats: DecodeStats | None = None,
                 input_context: tf.distribute.InputContext | None = None,
                 cache: bool = False, pad_to_batch: bool = False, batches_multiple_of: int = 1,
                 crop: str = "center", shuffle_seed: int | None = None) -> tf.data.Dataset:
    """One pass of (pixels, labels) with the 0.875 center crop, or resized only (`crop="none"`: images that
    were center-cropped already, as ImageNet-C's).

    `shuffle_seed`: the split in a fixed random order (a 10,000-record buffer), so that each batch mixes the
    classes as training batches do (a folder lists its images class by class): for an evaluation with each
    batch's own BN statistics.

    The last batch is short, or with `pad_to_batch` padded to `batch_size`
    with label -1 (static shapes). `batches_multiple_of` (with `pad_to_batch`)
    appends all-padding batches up to a multiple of that count: a pipeline
    feeding k replicas then never leaves a real batch without a partner,
    which tf.distribute would drop.
    """
    ds = source.dataset(split, input_context)
    if shuffle_seed is not None:
        ds = ds.shuffle(10_000, seed=shuffle_seed, reshuffle_each_iteration=False)
    if source.encoded:
        stats = stats or DecodeStats()
        ds = ds.filter(stats.keep)
    # Named functions, not lambdas: AutoGraph cannot parse several lambdas sharing lines.
    def prepare(data, label):
        return preprocess_eval(data, size, crop), label

    def pad(images, labels):
        return pad_batch(images, labels, batch_size)

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    if cache:
        ds = ds.cache()
    ds = ds.batch(batch_size)
    if pad_to_batch:
        ds = ds.map(pad)
        if batches_multiple_of > 1:
            k = batches_multiple_of
            filler = tf.data.Dataset.from_tensors(pad_batch(
                tf.zeros([0, size, size, 3]), tf.zeros([0], tf.int32), batch_size)).repeat(k - 1)
            ds = ds.concatenate(filler).batch(k, drop_remainder=True).unbatch()
    return ds.prefetch(tf.data.AUTOTUNE)


def pad_batch(images, labels, batch_size):
    """Pad a short batch to `batch_size`; padded examples have label -1."""
    missing = batch_size - tf.shape(labels)[0]
    images = tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]])
    labels = tf.pad(labels, [[0, missing]], constant_values=-1)
    images.set_shape([batch_size] + images.shape[1:].as_list())
    labels.set_shape([batch_size])
    return images, labels
