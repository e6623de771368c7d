"""The image operations of the authors' AutoAugment and RandAugment, with stateless randomness.

Ops take float32 [H, W, 3] images in [0, 255] and an explicit seed where they
draw anything, so a pipeline using them stays stateless and its iterator can be
checkpointed. `apply_operation` maps a magnitude level (10 = the authors'
_MAX_LEVEL, NOT a cap: RandAugment's 17 and 28 go beyond it) to each op's
argument as their code (tensorflow/tpu models/official/efficientnet/autoaugment.py):
rotate 30°·m, shear 0.3·m, translate const·m (AutoAugment 250 px, RandAugment
100 px), enhance 1.8·m + 0.1, solarize threshold int(256·m), solarize-add
int(110·m), posterize int(4·m) bits, cutout int(const·m) (RandAugment 40),
with m = level / 10; geometric ops fill with grey 128 and flip their sign at
random. Their quirks are kept and tested: contrast blends toward (pixel count /
256), not the mean grey; posterize's out-of-range uint8 shifts are clamped by
TensorFlow (0 bits keeps the top bit, more than 8 bits changes nothing).
"""

from __future__ import annotations

import math

import tensorflow as tf

MAX_LEVEL = 10.0
AUTOAUGMENT_TRANSLATE = 250.0
RANDAUGMENT_TRANSLATE = 100.0
RANDAUGMENT_CUTOUT = 40
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
    """Keep the `bits` high bits of each 8-bit value.

    The authors shift uint8 values by 8 - bits; TensorFlow clamps a uint8
    shift to [0, 7], so 0 bits keeps the top bit (not black) and 9+ bits keep
    everything (RandAugment magnitudes above 10).
    """
    shift = min(max(8 - int(bits), 0), 7)
    values = tf.cast(image, tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(values, shift), shift), tf.float32)


def contrast(image, factor):
    """Blend toward a flat grey of (number of pixels / 256), the authors' histogram-sum quirk."""
    gray = tf.cast(tf.cast(tf.image.rgb_to_grayscale(image), tf.int32), tf.float32)
    histogram = tf.histogram_fixed_width(gray, [0.0, 255.0], nbins=256)
    level = tf.reduce_sum(tf.cast(histogram, tf.float32)) / 256.0
    degenerate = tf.floor(tf.clip_by_value(tf.ones_like(image) * level, 0.0, 255.0))
    return _blend(degenerate, image, factor)


def brightness(image, factor):
    return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
    """Blend with a 3x3 smoothing ([1 1 1; 1 5 1; 1 1 1] / 13) of the interior; the border stays."""
    kernel = tf.tile(tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]])[:, :, None, None] / 13.0,
                     [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], padding="VALID")[0]
    smooth = tf.floor(tf.clip_by_value(smooth, 0.0, 255.0))
    interior = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior > 0, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return _blend(degenerate, image, factor)


def cutout(image, pad_size, seed, fill=FILL):
    """Fill a square of side up to 2·pad_size, centred at a random pixel, with grey."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    centre_y = tf.random.stateless_uniform([], seeds[0], 0, height, dtype=tf.int32)
    centre_x = tf.random.stateless_uniform([], seeds[1], 0, width, dtype=tf.int32)
    rows, cols = tf.range(height)[:, None, None], tf.range(width)[None, :, None]
    inside = ((rows >= centre_y - pad_size) & (rows < centre_y + pad_size)
              & (cols >= centre_x - pad_size) & (cols < centre_x + pad_size))
    return tf.where(inside, fill, image)


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


def translate_x(image, pixels):
    return _transform(image, tf.stack([1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image, pixels):
    return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0]))


# ------------------------------------------------------------ at a level
def _signed(value, seed):
    """`value` with a random sign, as the authors' geometric ops."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.where(flip, -value, value)


def apply_operation(image, name: str, level: float, seed, translate_const: float = AUTOAUGMENT_TRANSLATE,
                    cutout_const: int = RANDAUGMENT_CUTOUT):
    """One operation at magnitude `level` (10 = _MAX_LEVEL, not a cap); `seed` draws signs and positions."""
    m = level / MAX_LEVEL
    if name == "Equalize":
        return equalize(image)
    if name == "AutoContrast":
        return autocontrast(image)
    if name == "Invert":
        return invert(image)
    if name == "Color":
        return color(image, m * 1.8 + 0.1)
    if name == "Contrast":
        return contrast(image, m * 1.8 + 0.1)
    if name == "Brightness":
        return brightness(image, m * 1.8 + 0.1)
    if name == "Sharpness":
        return sharpness(image, m * 1.8 + 0.1)
    if name == "Cutout":
        return cutout(image, int(m * cutout_const), seed)
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
    if name == "TranslateX":
        return translate_x(image, _signed(tf.constant(m * translate_const), seed))
    if name == "TranslateY":
        return translate_y(image, _signed(tf.constant(m * translate_const), seed))
    raise ValueError(f"unknown augmentation operation {name!r}")


def as_uint8(image):
    """What a uint8 cast does to the authors' intermediate results: truncate, then saturate."""
    return tf.clip_by_value(tf.floor(image), 0.0, 255.0)
