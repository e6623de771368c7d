"""EfficientNet builder: parameter counts, Keras parity, domain routing, config, weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.models import (
    EFFICIENTNET_NAMES,
    EfficientNet,
    MultiBatchNormalization,
    build_efficientnet,
    round_filters,
    round_repeats,
)
from advprop_tf.models.base import IMAGENET_MEAN, IMAGENET_STD
from advprop_tf.models.keras_weights import copy_keras_application_weights
from tests.helpers import tiny_model

# keras.applications counts (with top, 1000 classes) include 7 parameters of
# Keras' input Normalization layer; our network normalizes without weights.
KERAS_APPLICATION_PARAMS = {
    "efficientnet-b0": 5_330_571,
    "efficientnet-b1": 7_856_239,
    "efficientnet-b2": 9_177_569,
    "efficientnet-b3": 12_320_535,
    "efficientnet-b4": 19_466_823,
    "efficientnet-b5": 30_562_527,
    "efficientnet-b6": 43_265_143,
    "efficientnet-b7": 66_658_687,
}


def bn_channels(model):
    return sum(layer.domain_variables(model.main_domain)["gamma"].shape[0] for layer in model.bn_layers())


@pytest.mark.parametrize("name", sorted(KERAS_APPLICATION_PARAMS))
def test_parameter_counts_match_keras_applications(name):
    one = build_efficientnet(name, domains=("clean",))
    assert one.count_params() == KERAS_APPLICATION_PARAMS[name] - 7
    if name == "efficientnet-b0":
        assert one.count_params() == 5_330_564


def test_each_extra_domain_adds_exactly_one_bn_per_bn_layer():
    name = "efficientnet-b0"  # (b2 added 41 s for the same rule)
    one = build_efficientnet(name, domains=("clean",))
    two = build_efficientnet(name, domains=("clean", "adv"))
    three = build_efficientnet(name, domains=("clean", "aug", "adv"))
    channels = bn_channels(one)
    assert two.count_params() - one.count_params() == 4 * channels
    assert three.count_params() - one.count_params() == 8 * channels
    # nothing but BN variables differ
    non_bn = lambda m: sorted(v.path for v in m.weights if "_bn/" not in v.path)
    assert non_bn(one) == non_bn(two) == non_bn(three)


def test_b8_and_l2_sizes():
    b8 = build_efficientnet("efficientnet-b8", domains=("clean",))
    assert 87e6 < b8.count_params() < 89e6
    assert b8.resolution == 672 and b8.dropout_rate == 0.5
    # L2 is ~480M parameters: check its structure without allocating it.
    assert round_filters(32, 4.3) == 136
    assert round_filters(1280, 4.3) == 5504
    assert [round_repeats(r, 5.3) for r in (1, 2, 2, 3, 3, 4, 1)] == [6, 11, 11, 16, 16, 22, 6]


def test_rounding_rules():
    assert round_filters(32, 1.0) == 32
    assert round_filters(32, 1.1) == 32  # 35.2 -> 32, not below 0.9 x 35.2
    assert round_filters(1280, 1.2) == 1536
    assert round_filters(16, 0.25) == 8  # never below the divisor
    assert round_filters(112, 1.4) == 160
    assert round_repeats(3, 1.1) == 4
    assert round_repeats(1, 3.1) == 4


def test_scaling_table_and_stages_of_b3():
    model = build_efficientnet("efficientnet-b3", domains=("clean",))
    assert (model.width_coefficient, model.depth_coefficient, model.resolution, model.dropout_rate) == (1.2, 1.4, 300, 0.3)
    assert len(model.blocks) == sum(round_repeats(r, 1.4) for r in (1, 2, 2, 3, 3, 4, 1)) == 26
    assert model.stem_conv.filters == 40 and model.head_conv.filters == 1536


def test_block_structure_se_dropconnect_and_bn_settings():
    model = build_efficientnet("efficientnet-b0", domains=("clean", "adv"))
    n = len(model.blocks)
    assert n == 16
    for i, block in enumerate(model.blocks):
        identity = block.strides == 1 and block.input_filters == block.output_filters
        assert block.id_skip == identity
        if identity:
            assert block.drop_connect is not None
            assert block.drop_connect.rate == pytest.approx(0.2 * i / n)
        else:
            assert block.drop_connect is None
        # squeeze width from the block INPUT filters
        assert block.se_reduce.filters == max(1, int(block.input_filters * 0.25))
        assert block.se_expand.filters == block.input_filters * block.expand_ratio
        assert block.se_reduce.use_bias and not block.project_conv.use_bias
    assert model.blocks[0].expand_ratio == 1 and not hasattr(model.blocks[0], "expand_conv")
    for bn in model.bn_layers():
        assert isinstance(bn, MultiBatchNormalization)
        assert bn.momentum == pytest.approx(0.99) and bn.epsilon == pytest.approx(1e-3)
        assert bn.domains == ("clean", "adv")


def test_initializers_match_the_authors():
    model = build_efficientnet("efficientnet-b0", domains=("clean",))
    head = model.head_conv.kernel.numpy()  # 1x1, 320 -> 1280
    assert abs(head.mean()) < 0.002
    assert head.std() == pytest.approx(np.sqrt(2.0 / 1280), rel=0.02)
    dw = model.blocks[10].depthwise_conv.kernel.numpy()  # 5x5 depthwise: fan_out 25
    assert dw.std() == pytest.approx(np.sqrt(2.0 / 25), rel=0.05)
    dense = model.classifier.kernel.numpy()
    bound = 1 / np.sqrt(1000)
    assert dense.max() <= bound and dense.min() >= -bound and dense.max() > 0.95 * bound
    assert np.all(model.classifier.bias.numpy() == 0)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="efficientnet-b9.*efficientnet-b0.*efficientnet-l2"):
        build_efficientnet("efficientnet-b9")
    with pytest.raises(ValueError, match="input_normalization"):
        build_efficientnet("efficientnet-b0", input_normalization="bogus")
    assert len(EFFICIENTNET_NAMES) == 10


def test_input_normalizations():
    pixels = tf.constant([[[[0.0, 127.5, 255.0]]]])
    from advprop_tf.models.base import normalize_pixels

    np.testing.assert_allclose(normalize_pixels(pixels, "inception")[0, 0, 0], [-1.0, 0.0, 1.0], atol=1e-6)
    expected = (np.array([0.0, 127.5, 255.0]) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(normalize_pixels(pixels, "imagenet")[0, 0, 0], expected, rtol=1e-6)


def keras_reference(app, size, seed=0):
    """A random Keras EfficientNet whose BN statistics are calibrated on random pixels.

    Calibration (moving statistics = batch statistics) keeps activations at a
    healthy scale, so comparing logits is a real test and not 0 == 0.
    """
    keras_model = app(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    norm = next(l for l in keras_model.layers if isinstance(l, keras.layers.Normalization))
    norm.set_weights([np.array(IMAGENET_MEAN) / 255, (np.array(IMAGENET_STD) / 255) ** 2, np.array(0)])
    norm.finalize_state()
    calib = np.random.default_rng(seed).uniform(0, 255, (4, size, size, 3)).astype("float32")
    for layer in keras_model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    keras_model(calib, training=True)
    return keras_model


@pytest.mark.parametrize(
    "app,name,size",
    [
        (keras.applications.EfficientNetB0, "efficientnet-b0", 224),
        (keras.applications.EfficientNetB0, "efficientnet-b0", 64),
        (keras.applications.EfficientNetB3, "efficientnet-b3", 96),
    ],
)
def test_parity_with_keras_applications(app, name, size):
    keras_model = keras_reference(app, size)
    ours = build_efficientnet(name, domains=("clean",))
    copy_keras_application_weights(keras_model, ours)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, size, size, 3)).astype("float32")
    want = keras_model(pixels, training=False).numpy()
    got = ours(pixels, training=False).numpy()
    assert np.abs(want).max() > 0.1  # activations did not collapse
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())
    assert np.abs(tf.nn.softmax(got) - tf.nn.softmax(want)).max() <= 1e-4


def test_keras_copy_fills_every_domain_and_rejects_other_architectures():
    keras_model = keras_reference(keras.applications.EfficientNetB0, 64)
    ours = build_efficientnet("efficientnet-b0", domains=("clean", "adv"))
    copy_keras_application_weights(keras_model, ours)
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(
        ours(pixels, training=False, domain="adv"), ours(pixels, training=False, domain="clean")
    )
    with pytest.raises(ValueError, match="not the same architecture"):
        copy_keras_application_weights(keras_model, build_efficientnet("efficientnet-b1", domains=("clean",)))


def bn_state(model):
    return {v.path: v.numpy().copy() for v in model.weights if "moving" in v.path}


@pytest.mark.parametrize("bn_mode", [None, "batch"])
def test_split_equals_routing_in_training_mode(bn_mode):
    kwargs = dict(dropout_rate=0.0, drop_connect_rate=0.0)
    split, routed = tiny_model(**kwargs), tiny_model(**kwargs)
    routed.set_weights(split.get_weights())
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    b = rng.uniform(50, 200, (4, 32, 32, 3)).astype("float32")
    before = bn_state(split)

    logits_split = split(np.concatenate([a, b]), training=True, domain=("clean", "adv"), bn_mode=bn_mode)
    logits_a = routed(a, training=True, domain="clean", bn_mode=bn_mode)
    logits_b = routed(b, training=True, domain="adv", bn_mode=bn_mode)
    np.testing.assert_allclose(logits_split, np.concatenate([logits_a, logits_b]), rtol=1e-4, atol=1e-4)
    after_split, after_routed = bn_state(split), bn_state(routed)
    changed = 0
    for path in before:
        np.testing.assert_allclose(after_split[path], after_routed[path], rtol=1e-5, atol=1e-6)
        changed += not np.array_equal(before[path], after_split[path])
    assert changed == (len(before) if bn_mode is None else 0)


def test_routing_to_one_domain_leaves_the_other_untouched():
    model = tiny_model()
    pixels = np.random.default_rng(4).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    for routed, other in (("adv", "clean"), ("clean", "adv")):
        before = bn_state(model)
        model(pixels, training=True, domain=routed)
        after = bn_state(model)
        for path in before:
            if f"/{other}_" in path:
                np.testing.assert_array_equal(before[path], after[path])
            else:
                assert not np.array_equal(before[path], after[path]), path


def test_model_errors_name_the_domains():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"'robust'.*\('clean', 'adv'\)"):
        model(np.zeros((2, 32, 32, 3), "float32"), domain="robust")
    with pytest.raises(ValueError, match=r"batch of 3 .*\('clean', 'adv'\)"):
        model(np.zeros((3, 32, 32, 3), "float32"), training=True, domain=("clean", "adv"))


def test_any_input_size_and_dtype():
    model = tiny_model()
    for size in (32, 48, 71):
        assert model(np.zeros((2, size, size, 3), "float32")).shape == (2, 10)


def test_config_round_trip_and_weights_save_load(tmp_path):
    model = tiny_model(num_classes=7, domains=("clean", "aug", "adv"), input_normalization="inception")
    config = model.get_config()
    clone = EfficientNet.from_config(config)
    assert clone.get_config() == config
    assert clone.count_params() == model.count_params()
    path = str(tmp_path / "tiny.weights.h5")
    model.save_weights(path)
    clone.load_weights(path)
    pixels = np.random.default_rng(5).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    for domain in ("clean", "aug", "adv"):
        np.testing.assert_allclose(
            clone(pixels, training=False, domain=domain), model(pixels, training=False, domain=domain), rtol=1e-6
        )
    # whole-model .keras round trip through the registered classes
    keras_path = str(tmp_path / "tiny.keras")
    model.save(keras_path)
    loaded = keras.models.load_model(keras_path)
    np.testing.assert_allclose(loaded(pixels, training=False), model(pixels, training=False), rtol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model_returns_float32_logits(policy):
    keras.mixed_precision.set_global_policy(policy)
    model = tiny_model()
    logits = model(np.random.default_rng(6).uniform(0, 255, (4, 32, 32, 3)).astype("float32"), training=True, domain=("clean", "adv"))
    assert logits.dtype == tf.float32
    assert np.all(np.isfinite(logits.numpy()))
    assert model.stem_conv.kernel.dtype == "float32"


def test_xla_forward_matches_eager():
    model = tiny_model()
    pixels = np.random.default_rng(7).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    fn = tf.function(lambda x: model(x, training=False, domain=("clean", "adv")), jit_compile=True)
    np.testing.assert_allclose(fn(pixels), model(pixels, training=False, domain=("clean", "adv")), rtol=1e-4, atol=1e-4)
