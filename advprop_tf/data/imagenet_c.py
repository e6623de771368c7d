"""ImageNet-C as its paper defines it (Hendrycks & Dietterich, 2019): 15 corruptions, 5 severities, mCE.

Two exact sources of corrupted images, besides our in-graph ImageNet-C-style
corruptions (corruptions.py, quick and seeded, but not ImageNet-C's numbers):
  - "tfds": the prepared TFDS datasets imagenet2012_corrupted/<name>_<severity>
    (ImageNet's validation set as ImageNet-C distributes it), 75 configurations;
  - "imagecorruptions": the `imagecorruptions` package, the ImageNet-C code
    packaged with its frost images, applied to any dataset on the CPU
    (pip install -e ".[corruptions]"). Its release (1.1.2) predates NumPy 2 and
    scikit-image 0.19+; `_compat()` restores the two names it still uses.
The mCE (evaluation.imagenet_c_mce): CE_c = sum_s err(c, s) / sum_s err_AlexNet(c, s),
mCE = 100 x mean_c CE_c over the 15 corruptions, AlexNet's published errors as the reference.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

IMAGENET_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
# AlexNet's top-1 error on ImageNet-C, averaged over the 5 severities (the ImageNet-C paper's reference).
ALEXNET_MEAN_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816,
    "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204,
    "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
SEVERITIES = (1, 2, 3, 4, 5)
BACKENDS = ("ingraph", "imagecorruptions", "tfds")


def tfds_name(corruption: str, severity: int) -> str:
    return f"imagenet2012_corrupted/{corruption}_{severity}"


# ------------------------------------------------------- imagecorruptions
def _compat():
    """What imagecorruptions 1.1.2 needs of NumPy < 2 and scikit-image < 0.19, nothing else."""
    import imagecorruptions.corruptions as ic
    from skimage import filters

    if not hasattr(np, "float_"):
        np.float_ = np.float64  # plasma_fractal (fog)
    if getattr(ic.gaussian, "__name__", "") != "gaussian_multichannel":
        def gaussian_multichannel(image, sigma=1, multichannel=None, **kwargs):  # glass_blur, gaussian_blur
            if multichannel is not None:
                kwargs.setdefault("channel_axis", -1 if multichannel else None)
            return filters.gaussian(image, sigma=sigma, **kwargs)

        ic.gaussian = gaussian_multichannel
    return ic


def exact_corruption(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """One uint8 HWC image corrupted by the ImageNet-C code (imagecorruptions), NumPy-seeded."""
    from imagecorruptions import corrupt

    _compat()
    state = np.random.get_state()
    np.random.seed(int(seed) % (2**32))  # the package draws from NumPy's global generator
    try:
        out = corrupt(np.asarray(image, np.uint8), corruption_name=name, severity=int(severity))
    finally:
        np.random.set_state(state)
    return np.asarray(out, np.uint8).reshape(image.shape)


def corrupt_exact(images, name: str, severity: int, seed=(0, 0)):
    """Like corruptions.corrupt (float [N, H, W, 3] in [0, 255]), with the ImageNet-C code on the CPU."""
    if name not in IMAGENET_C_CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(IMAGENET_C_CORRUPTIONS)}")
    seed = tf.cast(tf.reshape(tf.convert_to_tensor(seed), [-1])[:2], tf.int64)
    base = seed[0] * 1_000_003 + seed[1] * 7919 + sum(map(ord, name))  # per corruption, per batch

    def one(args):
        image, offset = args

        @tf.autograph.experimental.do_not_convert
        def run(pixels, element_seed):
            return exact_corruption(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), name, severity,
                                    int(element_seed))

        out = tf.numpy_function(run, [image, base + offset], tf.uint8, stateful=False)
        return tf.cast(tf.ensure_shape(out, image.shape), images.dtype)

    images = tf.convert_to_tensor(images)
    offsets = tf.range(tf.shape(images, out_type=tf.int64)[0])
    return tf.map_fn(one, (images, offsets), fn_output_signature=tf.TensorSpec(images.shape[1:], images.dtype))
