"""RandAugment as the authors' EfficientNet code has it (tensorflow/tpu, distort_image_with_randaugment).

Each of `num_layers` layers draws one of 16 ops uniformly and ALWAYS applies
it, at the fixed magnitude M on the authors' scale (10 = _MAX_LEVEL; NOT
capped: their B5 uses 17, B7/B8 28, and every op scales as M/10 beyond 10).
Translate 100 px·M/10, cutout 40 px·M/10, grey fill 128; applied after the
crop, flip and resize, with a per-image seed (stateless: the input iterator
still checkpoints). keras-cv's RandAugment, a different algorithm (10 of these
ops, random magnitudes, each applied with probability 10/11, magnitude capped
at 10), stays available as --augment=keras_cv_randaugment.
"""

from __future__ import annotations

import tensorflow as tf

from advprop_tf.data.augment_ops import RANDAUGMENT_CUTOUT, RANDAUGMENT_TRANSLATE, apply_operation, as_uint8

RANDAUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd",
)


def randaugment(image, seed, num_layers: int = 2, magnitude: float = 10.0):
    """`num_layers` uniformly drawn ops at `magnitude`; deterministic given `seed` (int32 [2])."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2 * num_layers)
    image = tf.round(tf.clip_by_value(image, 0.0, 255.0))
    for layer in range(num_layers):
        choice = tf.random.stateless_uniform([], seeds[2 * layer], 0, len(RANDAUGMENT_OPS), dtype=tf.int32)
        op_seed = seeds[2 * layer + 1]
        branches = [
            (lambda x=image, name=name: tf.ensure_shape(as_uint8(apply_operation(
                x, name, magnitude, op_seed, RANDAUGMENT_TRANSLATE, RANDAUGMENT_CUTOUT)), image.shape))
            for name in RANDAUGMENT_OPS
        ]
        image = tf.switch_case(choice, branches)
    return image
