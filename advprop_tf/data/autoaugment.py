"""AutoAugment, ImageNet policy "v0" of the authors' EfficientNet code, with stateless randomness.

Per image one of the 25 sub-policies is drawn; each of its two operations is
applied with its probability at its fixed magnitude level (0-10), mapped to an
argument as in the authors' code (augment_ops.py; translate 250 px·level/10).
keras-cv has no AutoAugment, and its random layers keep their own RNG state;
these ops take an explicit seed instead, so the whole training pipeline stays
stateless and its iterator can be checkpointed. Images are float32 [H, W, 3]
in [0, 255]; after each operation values are truncated to integers, as the
authors' uint8 pipeline does.
"""

from __future__ import annotations

import tensorflow as tf

from advprop_tf.data.augment_ops import AUTOAUGMENT_TRANSLATE, apply_operation, as_uint8

POLICY_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)


def autoaugment(image, seed, policy=POLICY_V0):
    """Apply one random sub-policy of `policy` to `image`; deterministic given `seed` (int32 [2])."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)
    index = tf.random.stateless_uniform([], seeds[0], 0, len(policy), dtype=tf.int32)
    image = tf.round(tf.clip_by_value(image, 0.0, 255.0))

    def branch(sub_policy):
        def run():
            x = image
            for i, (name, probability, level) in enumerate(sub_policy):
                apply = tf.random.stateless_uniform([], seeds[1 + 2 * i]) < probability
                x = tf.cond(apply, lambda x=x, n=name, lv=level, s=seeds[2 + 2 * i]: as_uint8(
                    apply_operation(x, n, lv, s, AUTOAUGMENT_TRANSLATE)), lambda x=x: x)
            return tf.ensure_shape(x, image.shape)

        return run

    return tf.switch_case(index, [branch(sub_policy) for sub_policy in policy])
