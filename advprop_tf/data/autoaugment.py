"""AutoAugment, ImageNet policy "v0" of the authors' EfficientNet code, with stateless randomness.

Per image one of the 25 sub-policies is drawn; each of its two operations is
applied with its probability at its fixed magnitude level (0-10), mapped to
an argument as in the authors' code (rotate 30°·level/10, shear 0.3·level/10,
translate 250 px·level/10, enhance 1.8·level/10 + 0.1, solarize threshold
256·level/10, solarize-add 110·level/10, posterize 4·level/10 bits;
geometric ops fill with grey 128 and flip their sign at random).

keras-cv 0.9 has no AutoAugment, and its random layers keep their own RNG
state; these ops take an explicit seed instead, so the whole training
pipeline stays stateless and its iterator can be checkpointed.
Images are float32 [H, W, 3] in [0, 255]; after each operation values are
truncated to integers, as the authors' uint8 pipeline does.
"""

from __future__ import annotations

import math

import tensorflow as tf

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
MAX_LEVEL = 10.0
TRANSLATE_CONST = 250.0
FILL = 128.0


# ----------------------------------------------------------------- colour ops
def _blend(degenerate, image, factor):
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def color(image, factor):
    """Saturation: blend with the greyscale image."""
    gray = tf.image.grayscale_to_rgb(tf.round(tf.image.rgb_to_grayscale(image)))
    return _blend(gray, image, factor)


def invert(image):
    return 255.0 - image


def solarize(image, threshold):
    return tf.where(image < threshold, image, 255.0 - image)


def solarize_add(image, addition, threshold=128.0):
    return tf.where(image < threshold, tf.clip_by_value(image + addition, 0.0, 255.0), image)


def posterize(image, bits: int):
    """Keep the `bits` high bits of each 8-bit value (0 bits: black, as in the authors' code)."""
    shift = 8 - bits
    values = tf.cast(image, tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(values, shift), shift), tf.float32)


def autocontrast(image):
    """Stretch each channel to [0, 255]; a flat channel is left as it is."""
    low = tf.reduce_min(image, axis=[0, 1], keepdims=True)
    high = tf.reduce_max(image, axis=[0, 1], keepdims=True)
    scale = 255.0 / tf.maximum(high - low, 1e-6)
    stretched = tf.clip_by_value((image - low) * scale, 0.0, 255.0)
    return tf.where(high > low, stretched, image)


def equalize(image):
    """Per-channel histogram equalization (PIL's ImageOps.equalize)."""
    values = tf.cast(image, tf.int32)

    def channel(c):
        histogram = tf.math.bincount(c, minlength=256, maxlength=256)
        nonzero = tf.boolean_mask(histogram, histogram > 0)
        step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
        lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.where(step == 0, c, tf.gather(lut, c))

    return tf.cast(tf.stack([channel(values[..., i]) for i in range(3)], axis=-1), tf.float32)


# -------------------------------------------------------------- geometric ops
def _transform(image, matrix):
    """Projective transform (output -> input coordinates), nearest neighbour, grey fill."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.cast(tf.reshape(matrix, [1, 8]), tf.float32),
        output_shape=tf.shape(image)[:2], fill_value=FILL, interpolation="NEAREST", fill_mode="CONSTANT",
    )[0]


def rotate(image, degrees):
    """Rotate about the centre by `degrees` (counter-clockwise)."""
    radians = degrees * math.pi / 180.0
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(radians), tf.sin(radians)
    x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
    y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
    return _transform(image, tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0]))


def shear_x(image, level):
    return _transform(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image, level):
    return _transform(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image, pixels):
    return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0]))


# ---------------------------------------------------------------- the policy
def _signed(value, seed):
    """`value` with a random sign, as the authors' geometric ops."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.where(flip, -value, value)


def apply_operation(image, name: str, level: float, seed):
    """One operation at its magnitude `level` (0-10); `seed` picks the sign of geometric ones."""
    m = level / MAX_LEVEL
    if name == "Equalize":
        return equalize(image)
    if name == "AutoContrast":
        return autocontrast(image)
    if name == "Invert":
        return invert(image)
    if name == "Color":
        return color(image, m * 1.8 + 0.1)
    if name == "Solarize":
        return solarize(image, float(int(m * 256)))
    if name == "SolarizeAdd":
        return solarize_add(image, float(int(m * 110)))
    if name == "Posterize":
        return posterize(image, int(m * 4))
    if name == "Rotate":
        return rotate(image, _signed(tf.constant(m * 30.0), seed))
    if name == "ShearX":
        return shear_x(image, _signed(tf.constant(m * 0.3), seed))
    if name == "ShearY":
        return shear_y(image, _signed(tf.constant(m * 0.3), seed))
    if name == "TranslateY":
        return translate_y(image, _signed(tf.constant(m * TRANSLATE_CONST), seed))
    raise ValueError(f"unknown AutoAugment operation {name!r}")


def _as_uint8(image):
    """What a uint8 cast does to the authors' intermediate results: truncate, then saturate."""
    return tf.clip_by_value(tf.floor(image), 0.0, 255.0)


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
                x = tf.cond(apply, lambda x=x, n=name, lv=level, s=seeds[2 + 2 * i]: _as_uint8(
                    apply_operation(x, n, lv, s)), lambda x=x: x)
            return tf.ensure_shape(x, image.shape)

        return run

    return tf.switch_case(index, [branch(sub_policy) for sub_policy in policy])
