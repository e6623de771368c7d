"""The authors' augmentation ops, AutoAugment v0 sub-policies and RandAugment, against hand-computed values."""

import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.data import augment_ops as ops
from advprop_tf.data.autoaugment import POLICY_V0, autoaugment
from advprop_tf.data.randaugment import RANDAUGMENT_OPS, randaugment

# A 4x4 image whose every value is known: channel c of pixel (y, x) = 16 * (4y + x) + 60c (mod 256).
SMALL = np.array([[[(16 * (4 * y + x) + 60 * c) % 256 for c in range(3)] for x in range(4)] for y in range(4)],
                 dtype=np.float32)


def run(name, level, seed=(1, 2), **kwargs):
    return ops.as_uint8(ops.apply_operation(tf.constant(SMALL), name, level, tf.constant(seed), **kwargs)).numpy()


def test_colour_ops_at_a_level_match_hand_computed_values():
    # Brightness at level 5: factor 0.5*1.8+0.1 = 1.0 -> unchanged; level 0: factor 0.1 -> floor(0.1 * x)
    np.testing.assert_array_equal(run("Brightness", 5), SMALL)
    np.testing.assert_array_equal(run("Brightness", 0), np.floor(0.1 * SMALL))
    np.testing.assert_array_equal(run("Invert", 3), 255 - SMALL)
    # SolarizeAdd level 10: +110 below 128; level 28 (uncapped): +308, saturating at 255
    np.testing.assert_array_equal(run("SolarizeAdd", 10), np.where(SMALL < 128, np.minimum(SMALL + 110, 255), SMALL))
    np.testing.assert_array_equal(run("SolarizeAdd", 28), np.where(SMALL < 128, 255, SMALL))
    # Solarize level 5: threshold int(0.5 * 256) = 128
    np.testing.assert_array_equal(run("Solarize", 5), np.where(SMALL < 128, SMALL, 255 - SMALL))
    # Posterize level 5: int(0.5 * 4) = 2 bits
    np.testing.assert_array_equal(run("Posterize", 5), SMALL.astype(np.uint8) & 0b11000000)
    # Contrast: blends toward 16 pixels / 256 = 0.0625 -> floor = 0 grey, the authors' quirk; level 0: factor 0.1
    np.testing.assert_array_equal(run("Contrast", 0), np.floor(0.1 * SMALL))


def test_sharpness_smooths_the_interior_only():
    # level 0: factor 0.1 -> 0.9 * smoothed + 0.1 * image inside, the border unchanged
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
    smooth = SMALL.copy()
    for y in (1, 2):
        for x in (1, 2):
            for c in range(3):
                smooth[y, x, c] = np.floor(np.sum(SMALL[y - 1:y + 2, x - 1:x + 2, c] * kernel))
    want = np.floor(np.clip(smooth + 0.1 * (SMALL - smooth), 0, 255))
    np.testing.assert_allclose(run("Sharpness", 0), want, atol=1.0)  # float rounding of the 1/13 kernel
    np.testing.assert_array_equal(run("Sharpness", 0)[0], SMALL[0])


def test_geometric_ops_and_cutout():
    shifted = ops.translate_x(tf.constant(SMALL), tf.constant(1.0)).numpy()
    np.testing.assert_array_equal(shifted[:, 1:], SMALL[:, :-1])
    np.testing.assert_array_equal(shifted[:, 0], 128.0)
    # shear by 1: output (y, x) reads input (y, x + y) for ShearX, (y + x, x) for ShearY; grey outside
    sheared = ops.shear_x(tf.constant(SMALL), tf.constant(1.0)).numpy()
    sheared_y = ops.shear_y(tf.constant(SMALL), tf.constant(1.0)).numpy()
    for y in range(4):
        for x in range(4):
            want_x = SMALL[y, x + y] if x + y < 4 else np.full(3, 128.0)
            want_y = SMALL[y + x, x] if x + y < 4 else np.full(3, 128.0)
            np.testing.assert_array_equal(sheared[y, x], want_x)
            np.testing.assert_array_equal(sheared_y[y, x], want_y)
    # Cutout: RandAugment's const 40 at level 0.5 -> pad int(0.05 * 40) = 2: a square of side <= 4 of grey
    out = run("Cutout", 0.5)
    grey = np.all(out == 128.0, axis=-1) & np.any(SMALL != 128.0, axis=-1)
    rows, cols = np.nonzero(grey)
    assert grey.sum() >= 4 and rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4
    np.testing.assert_array_equal(out[~grey], SMALL[~grey])
    # Rotate: 30 degrees at level 10, 84 at the uncapped 28: different images
    assert not np.array_equal(run("Rotate", 10, seed=(0, 0)), run("Rotate", 28, seed=(0, 0)))


@pytest.mark.parametrize("index", range(len(POLICY_V0)))
def test_every_autoaugment_v0_sub_policy_runs(index):
    always = (tuple((name, 1.0, level) for name, _, level in POLICY_V0[index]),)
    image = tf.constant(np.random.default_rng(index).uniform(0, 255, (24, 24, 3)).round().astype(np.float32))
    out = autoaugment(image, tf.constant([index, 1]), policy=always).numpy()
    assert out.shape == (24, 24, 3) and out.min() >= 0 and out.max() <= 255
    np.testing.assert_array_equal(out, np.floor(out))


def test_randaugment_has_the_authors_16_ops_and_always_applies_one():
    assert len(RANDAUGMENT_OPS) == 16 and len(set(RANDAUGMENT_OPS)) == 16
    assert {"Invert", "Cutout", "SolarizeAdd", "TranslateX", "Sharpness", "Brightness"} <= set(RANDAUGMENT_OPS)
    image = tf.constant(np.random.default_rng(0).uniform(0, 255, (24, 24, 3)).round().astype(np.float32))
    outputs = [randaugment(image, tf.constant([7, i]), num_layers=1, magnitude=10).numpy() for i in range(24)]
    # One layer always applies its op: at magnitude 10 every op but Equalize/AutoContrast of this
    # image changes it, so (almost) no draw leaves it as it was.
    assert sum(np.array_equal(o, image.numpy()) for o in outputs) <= 4
    np.testing.assert_array_equal(outputs[3], randaugment(image, tf.constant([7, 3]), 1, 10).numpy())


def test_randaugment_magnitude_is_not_capped_at_10():
    image = tf.constant(np.random.default_rng(1).uniform(0, 255, (24, 24, 3)).round().astype(np.float32))
    differ = sum(not np.array_equal(randaugment(image, tf.constant([3, i]), 2, 10).numpy(),
                                    randaugment(image, tf.constant([3, i]), 2, 28).numpy()) for i in range(8))
    assert differ >= 4  # the same ops drawn, at 28 instead of 10: a capped magnitude would give equal images
