"""ImageNet-C-style corruptions (Hendrycks & Dietterich, 2019), in TensorFlow, on the fly.

Quick and seeded, but NOT ImageNet-C's numbers: for those, evaluate with
--corruption_backend=tfds or imagecorruptions (data/imagenet_c.py). How close
these are to the ImageNet-C code where both define a corruption is tested
(tests/test_imagenet_c.py).

`corrupt(images, name, severity, seed)` takes a batch of float pixels in
[0, 255] with a static spatial size and returns the corrupted batch, same
shape and dtype, in [0, 255]. Randomness comes only from stateless ops seeded
by `seed`, so the same seed gives the same pixels.

Severity parameters are ImageNet-C's (defined at 224 px); spatial ones (blur
radii, pixel block sizes) scale with the image size so a 64 px image gets a
comparable corruption. Deviations, stated: `saturate` uses only ImageNet-C's
over-saturation direction so that severity grows monotonically, and the
corruptions that need external images or heavy geometry (frost, snow, fog,
glass blur, elastic transform, spatter) are not generated here; prepared TFDS
`imagenet2012_corrupted/<name>_<severity>` covers them as a plain dataset.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 224.0

_GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
_SHOT_NOISE = (60.0, 25.0, 12.0, 5.0, 3.0)
_IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)
_SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)
_GAUSSIAN_BLUR = (1.0, 2.0, 3.0, 4.0, 6.0)
_DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))
_MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))
_ZOOM_BLUR = ((1.0, 1.11, 0.01), (1.0, 1.16, 0.01), (1.0, 1.21, 0.02), (1.0, 1.26, 0.02), (1.0, 1.31, 0.03))
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
_SATURATE = ((1.5, 0.0), (2.0, 0.0), (3.0, 0.05), (5.0, 0.1), (20.0, 0.2))
_JPEG_QUALITY = (25, 18, 15, 10, 7)
_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)


# ------------------------------------------------------------------ helpers
def _seeds(seed, n):
    """n independent stateless seeds derived from one seed pair."""
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), n)


def _scale(images) -> float:
    return min(int(images.shape[1]), int(images.shape[2])) / REFERENCE_SIZE


def _filter(images, kernel):
    """Depthwise 2-D filter with reflect padding, one kernel [k, k] for all channels."""
    k = int(kernel.shape[0])
    pad = k // 2
    height, width = int(images.shape[1]), int(images.shape[2])
    if pad < min(height, width):
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    else:  # a kernel wider than the image: reflection is undefined, repeat the edge
        padded = _edge_pad(images, pad)
    channels = int(images.shape[-1])
    weights = tf.tile(tf.reshape(tf.cast(kernel, images.dtype), [k, k, 1, 1]), [1, 1, channels, 1])
    return tf.nn.depthwise_conv2d(padded, weights, [1, 1, 1, 1], "VALID")


def _edge_pad(images, pad):
    for axis in (1, 2):
        first = tf.gather(images, [0], axis=axis)
        last = tf.gather(images, [images.shape[axis] - 1], axis=axis)
        images = tf.concat([tf.repeat(first, pad, axis=axis), images, tf.repeat(last, pad, axis=axis)], axis)
    return images


def gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    kernel = np.outer(g, g)
    return (kernel / kernel.sum()).astype(np.float32)


def disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """ImageNet-C's defocus kernel: a disk of `radius` pixels, softened by a small Gaussian."""
    r = max(1, int(math.ceil(radius)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    xx, yy = np.meshgrid(x, x)
    # Soft edge (coverage of each pixel) so that a fractional radius, as at
    # small image sizes, still grows the blur continuously.
    disk = np.clip(radius + 0.5 - np.sqrt(xx ** 2 + yy ** 2), 0.0, 1.0)
    disk /= disk.sum()
    if alias_sigma > 0:
        g = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias_sigma ** 2))
        g /= g.sum()
        padded = np.pad(disk, 1)
        disk = sum(g[i] * g[j] * padded[i:i + disk.shape[0], j:j + disk.shape[1]]
                   for i in range(3) for j in range(3))
    return (disk / disk.sum()).astype(np.float32)


def _motion_kernel(radius: int, sigma: float, angle):
    """One-sided line of Gaussian weights from the centre at `angle` (radians), like ImageMagick's."""
    size = 2 * radius + 1
    d = tf.range(radius + 1, dtype=tf.float32)
    weights = tf.exp(-tf.square(d) / (2.0 * sigma ** 2))
    rows = tf.cast(tf.round(radius + d * tf.sin(angle)), tf.int32)
    cols = tf.cast(tf.round(radius + d * tf.cos(angle)), tf.int32)
    kernel = tf.scatter_nd(tf.stack([rows, cols], axis=1), weights, [size, size])
    return kernel / tf.reduce_sum(kernel)


# -------------------------------------------------------------- corruptions
# Each works on pixels scaled to [0, 1]; `corrupt` scales and clips.
def gaussian_noise(x, severity, seed):
    c = _GAUSSIAN_NOISE[severity - 1]
    return x + c * tf.random.stateless_normal(tf.shape(x), seed)


def shot_noise(x, severity, seed):
    c = _SHOT_NOISE[severity - 1]
    return tf.random.stateless_poisson(tf.shape(x), seed, lam=x * c, dtype=tf.float32) / c


def impulse_noise(x, severity, seed):
    """Salt and pepper on each value; the same draw at every severity, so the set only grows."""
    amount = _IMPULSE_NOISE[severity - 1]
    u = tf.random.stateless_uniform(tf.shape(x), seed)
    x = tf.where(u < amount / 2, tf.ones_like(x), x)
    return tf.where(u > 1 - amount / 2, tf.zeros_like(x), x)


def speckle_noise(x, severity, seed):
    c = _SPECKLE_NOISE[severity - 1]
    return x + x * c * tf.random.stateless_normal(tf.shape(x), seed)


def gaussian_blur(x, severity, seed):
    del seed
    return _filter(x, gaussian_kernel(_GAUSSIAN_BLUR[severity - 1] * _scale(x)))


def defocus_blur(x, severity, seed):
    del seed
    radius, alias = _DEFOCUS_BLUR[severity - 1]
    return _filter(x, disk_kernel(radius * _scale(x), alias))


def motion_blur(x, severity, seed):
    """A blur along a line, at an angle drawn per image in [-45°, 45°]."""
    radius, sigma = _MOTION_BLUR[severity - 1]
    scale = _scale(x)
    radius = max(1, int(round(radius * scale)))
    sigma = max(0.5, sigma * scale)
    angles = tf.random.stateless_uniform([tf.shape(x)[0]], seed, -math.pi / 4, math.pi / 4)

    def blur_one(args):
        image, angle = args
        return _filter(image[None], _motion_kernel(radius, sigma, angle))[0]

    return tf.map_fn(blur_one, (x, angles), fn_output_signature=tf.TensorSpec(x.shape[1:], x.dtype))


def zoom_blur(x, severity, seed):
    """The mean of the image and centre zooms of it, as if zoomed during the exposure."""
    del seed
    start, stop, step = _ZOOM_BLUR[severity - 1]
    zooms = np.arange(start, stop, step)
    height, width = int(x.shape[1]), int(x.shape[2])
    total = x
    for zoom in zooms:
        h, w = max(1, int(round(height / zoom))), max(1, int(round(width / zoom)))
        top, left = (height - h) // 2, (width - w) // 2
        crop = x[:, top:top + h, left:left + w, :]
        total = total + tf.image.resize(crop, [height, width], method="bilinear")
    return total / (len(zooms) + 1)


def contrast(x, severity, seed):
    """Toward each channel's mean (ImageNet-C: np.mean(x, axis=(0, 1)) per image)."""
    del seed
    c = _CONTRAST[severity - 1]
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    return (x - mean) * c + mean


def brightness(x, severity, seed):
    del seed
    hsv = tf.image.rgb_to_hsv(tf.clip_by_value(x, 0.0, 1.0))
    h, s, v = tf.unstack(hsv, axis=-1)
    v = tf.clip_by_value(v + _BRIGHTNESS[severity - 1], 0.0, 1.0)
    return tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1))


def saturate(x, severity, seed):
    del seed
    factor, shift = _SATURATE[severity - 1]
    hsv = tf.image.rgb_to_hsv(tf.clip_by_value(x, 0.0, 1.0))
    h, s, v = tf.unstack(hsv, axis=-1)
    s = tf.clip_by_value(s * factor + shift, 0.0, 1.0)
    return tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1))


def jpeg_compression(x, severity, seed):
    del seed
    quality = _JPEG_QUALITY[severity - 1]
    return tf.map_fn(lambda image: tf.image.adjust_jpeg_quality(image, quality), x,
                     fn_output_signature=tf.TensorSpec(x.shape[1:], x.dtype))


def pixelate(x, severity, seed):
    """Down-sample with box averaging, up-sample with nearest neighbour (PIL BOX both ways)."""
    del seed
    c = _PIXELATE[severity - 1]
    height, width = int(x.shape[1]), int(x.shape[2])
    small = tf.image.resize(x, [max(1, int(height * c)), max(1, int(width * c))], method="area")
    return tf.image.resize(small, [height, width], method="nearest")


CORRUPTIONS = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "contrast": contrast,
    "brightness": brightness,
    "saturate": saturate,
    "jpeg_compression": jpeg_compression,
    "pixelate": pixelate,
}


def parse_corruptions(text: str, valid=tuple(CORRUPTIONS), kind: str = "corruption") -> tuple:
    """'all' or 'name,name,...' of `valid` -> names; ValueError names the unknown one."""
    text = (text or "").strip()
    if not text:
        return ()
    if text == "all":
        return tuple(valid)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown {kind} {name!r}; valid: all, {', '.join(valid)}")
    return names


def parse_severities(values) -> tuple:
    severities = tuple(int(v) for v in values)
    for s in severities:
        if s not in SEVERITIES:
            raise ValueError(f"severity {s} is outside 1..5")
    if not severities:
        raise ValueError("no severity given")
    return severities


def corrupt(images, name: str, severity: int, seed=(0, 0)):
    """`images` (float [N, H, W, 3] in [0, 255], static H and W) corrupted by `name` at `severity`."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} is outside 1..5")
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4 or images.shape[1] is None or images.shape[2] is None:
        raise ValueError(f"corrupt() needs images [N, H, W, C] with a static H and W, got {images.shape}")
    # One random stream per corruption, the same at every severity: the noise
    # grows with the severity rather than being redrawn.
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    salt = sorted(CORRUPTIONS).index(name) + 1
    stream = _seeds(tf.stack([seed[0], seed[1] * 64 + salt]), 1)[0]
    x = tf.cast(images, tf.float32) / 255.0
    out = CORRUPTIONS[name](x, severity, stream)
    return tf.cast(tf.clip_by_value(out, 0.0, 1.0) * 255.0, images.dtype)
