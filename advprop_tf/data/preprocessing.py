"""The authors' preprocessing: float32 pixels in [0, 255]; normalization is the model's.

Train: distorted-bounding-box crop (area 0.08-1, aspect 3/4-4/3, 10 attempts,
center-crop fallback), bicubic resize, random horizontal flip.
Eval: center crop of 0.875 of the shorter side, bicubic resize; or, for images that
are already cropped (ImageNet-C: 224 x 224 after its own center crop), resize only.
JPEGs are cropped while decoding (decode_and_crop_jpeg), as the authors do.
Degenerate images (1 x 1, 3000 x 20) are cropped to at least one pixel and resized,
never dropped.
"""

from __future__ import annotations

import tensorflow as tf

CROP_FRACTION = 0.875
# "center": the authors' 0.875 center crop; "none": resize the whole image (already-cropped sources).
EVAL_CROPS = ("center", "none")


def eval_crop_padding(size: int) -> int:
    """size + padding is the side of which the center crop keeps `size` (0.875 fraction)."""
    return int(round(size * (1.0 / CROP_FRACTION - 1.0)))


def _image_shape(data):
    """[height, width, channels] of encoded bytes or a decoded image."""
    if data.dtype == tf.string:
        return tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.image.extract_jpeg_shape(data),
            lambda: tf.shape(tf.io.decode_image(data, channels=3, expand_animations=False)),
        )
    return tf.shape(data)


def _crop(data, window):
    """Crop [y, x, h, w] out of encoded bytes (decoding only the window for JPEGs) or an image."""
    if data.dtype == tf.string:
        return tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.image.decode_and_crop_jpeg(data, window, channels=3),
            lambda: tf.image.crop_to_bounding_box(
                tf.io.decode_image(data, channels=3, expand_animations=False),
                window[0], window[1], window[2], window[3]),
        )
    return tf.image.crop_to_bounding_box(data, window[0], window[1], window[2], window[3])


def center_crop_window(shape, size: int):
    """The authors' eval window: size / (size + padding) of the shorter side, centred."""
    height, width = shape[0], shape[1]
    crop = tf.maximum(tf.cast(
        size / (size + eval_crop_padding(size)) * tf.cast(tf.minimum(height, width), tf.float32),
        tf.int32,
    ), 1)  # a 1 x 1 image keeps its one pixel
    return tf.stack([(height - crop + 1) // 2, (width - crop + 1) // 2, crop, crop])


def resize(image, size: int):
    """Bicubic resize, clipped back to [0, 255] (bicubic overshoots)."""
    image = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bicubic")
    return tf.clip_by_value(image, 0.0, 255.0)


def whole_image_window(shape):
    return tf.stack([0, 0, shape[0], shape[1]])


def preprocess_eval(data, size: int, crop: str = "center"):
    """Encoded bytes or uint8 image -> float32 [size, size, 3] in [0, 255].

    `crop`: "center" (the authors' eval crop) or "none" (resize only, for sources
    whose images were center-cropped already, such as ImageNet-C).
    """
    if crop not in EVAL_CROPS:
        raise ValueError(f"eval crop must be one of {EVAL_CROPS}, got {crop!r}")
    shape = _image_shape(data)
    window = center_crop_window(shape, size) if crop == "center" else whole_image_window(shape)
    image = resize(_crop(data, window), size)
    image.set_shape([size, size, 3])
    return image


def distorted_crop_window(shape, seed=None, min_area=0.08, max_area=1.0,
                          aspect_ratio_range=(3 / 4, 4 / 3), attempts=10):
    """[y, x, h, w] of a random crop; `ok` is False when all attempts failed."""
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
    kwargs = dict(
        bounding_boxes=bbox, min_object_covered=0.1, aspect_ratio_range=aspect_ratio_range,
        area_range=(min_area, max_area), max_attempts=attempts, use_image_if_no_bounding_boxes=True,
    )
    if seed is None:
        begin, crop_size, _ = tf.image.sample_distorted_bounding_box(shape, **kwargs)
    else:
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(shape, seed=seed, **kwargs)
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    # The sampler returns the whole image when no attempt fits.
    whole = tf.reduce_all(tf.equal(crop_size[:2], shape[:2]))
    return window, tf.logical_not(whole)


def preprocess_train(data, size: int, seed=None, flip=True, min_area=0.08):
    """Random crop (center-crop fallback), bicubic resize, random flip -> float32 [size, size, 3].

    `min_area`: the smallest crop, as a fraction of the image (authors: 0.08).
    """
    shape = _image_shape(data)
    window, ok = distorted_crop_window(shape, seed, min_area=min_area)
    window = tf.where(ok, window, center_crop_window(shape, size))
    image = resize(_crop(data, window), size)
    if flip:
        if seed is None:
            image = tf.image.random_flip_left_right(image)
        else:
            image = tf.image.stateless_random_flip_left_right(image, seed + 1)
    image.set_shape([size, size, 3])
    return image


def is_decodable_image(data):
    """Cheap validity check of encoded bytes: a JPEG/PNG/GIF/BMP/WebP header, and a JPEG end marker.

    Catches empty files, non-images and truncated JPEG downloads without
    decoding, so a corrupt file is skipped (and counted) instead of raising.
    """
    length = tf.strings.length(data)
    head = tf.io.decode_raw(tf.strings.substr(data, 0, 12), tf.uint8)
    head = tf.pad(head, [[0, 12 - tf.shape(head)[0]]])
    jpeg = (head[0] == 0xFF) & (head[1] == 0xD8) & (head[2] == 0xFF)
    png = (head[0] == 0x89) & (head[1] == ord("P")) & (head[2] == ord("N")) & (head[3] == ord("G"))
    gif = (head[0] == ord("G")) & (head[1] == ord("I")) & (head[2] == ord("F"))
    bmp = (head[0] == ord("B")) & (head[1] == ord("M"))
    webp = tf.reduce_all(tf.equal(head[:4], tf.constant(list(b"RIFF"), tf.uint8))) & tf.reduce_all(
        tf.equal(head[8:12], tf.constant(list(b"WEBP"), tf.uint8)))
    # A complete JPEG ends with EOI (FF D9), allowing a little trailing padding.
    tail = tf.io.decode_raw(tf.strings.substr(data, tf.maximum(length - 16, 0), 16), tf.uint8)
    eoi = tf.reduce_any((tail[:-1] == 0xFF) & (tail[1:] == 0xD9))
    return (length > 16) & ((jpeg & eoi) | png | gif | bmp | webp)
