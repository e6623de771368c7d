"""The authors' TF1 checkpoints and Keras .h5 weights: conversion, fine-tuning init, clear errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.train_flags import make_config
from advprop_tf.conversion import ConvertError, convert
from advprop_tf.training.trained import load_trained
from advprop_tf.models import build_efficientnet
from advprop_tf.models.multi_bn import MultiBatchNormalization
from advprop_tf.training.initialization import InitError, initialize_from
from advprop_tf.training.loop import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width_coefficient=0.25, depth_coefficient=0.25, resolution=32)
SCOPE = "efficientnet-b0"


def randomized(model, seed):
    """Every weight, BN statistics included, set to random values (so that each one matters)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.normal(0, 0.1, variable.shape)
        if "variance" in variable.path or "gamma" in variable.path:
            value = np.abs(value) + 0.5
        variable.assign(value.astype(np.float32))
    return model


def authors_variables(model):
    """(name, variable) as the authors' Keras layers name them (tensorflow/tpu models/official/efficientnet/
    efficientnet_model.py: stem/conv2d, tpu_batch_normalization, blocks_K/...), written out independently of
    advprop_tf's own mapping."""
    def bn(prefix, layer):
        v = layer.domain_variables("clean")
        return [(f"{prefix}/{k}", v[k]) for k in ("gamma", "beta", "moving_mean", "moving_variance")]

    names = [(f"{SCOPE}/stem/conv2d/kernel", model.stem_conv.kernel)] + bn(f"{SCOPE}/stem/tpu_batch_normalization", model.stem_bn)
    for k, block in enumerate(model.blocks):
        p = f"{SCOPE}/blocks_{k}"
        if block.expand_ratio != 1:
            names += [(f"{p}/conv2d/kernel", block.expand_conv.kernel)] + bn(f"{p}/tpu_batch_normalization", block.expand_bn)
            dw_bn, proj, proj_bn = "tpu_batch_normalization_1", "conv2d_1", "tpu_batch_normalization_2"
        else:
            dw_bn, proj, proj_bn = "tpu_batch_normalization", "conv2d", "tpu_batch_normalization_1"
        names += [(f"{p}/depthwise_conv2d/depthwise_kernel", block.depthwise_conv.kernel)]
        names += bn(f"{p}/{dw_bn}", block.depthwise_bn)
        names += [(f"{p}/se/conv2d/kernel", block.se_reduce.kernel), (f"{p}/se/conv2d/bias", block.se_reduce.bias),
                  (f"{p}/se/conv2d_1/kernel", block.se_expand.kernel), (f"{p}/se/conv2d_1/bias", block.se_expand.bias)]
        names += [(f"{p}/{proj}/kernel", block.project_conv.kernel)] + bn(f"{p}/{proj_bn}", block.project_bn)
    names += [(f"{SCOPE}/head/conv2d/kernel", model.head_conv.kernel)]
    names += bn(f"{SCOPE}/head/tpu_batch_normalization", model.head_bn)
    names += [(f"{SCOPE}/head/dense/kernel", model.classifier.kernel), (f"{SCOPE}/head/dense/bias", model.classifier.bias)]
    return names


def authors_names(model):
    return [(name, np.asarray(variable)) for name, variable in authors_variables(model)]


def write_tf1_checkpoint(prefix, ema_values, raw_offset=0.5, drop=(), reshape=()):
    """A graph-mode tf.compat.v1 checkpoint: raw variables, EMA shadows, RMSProp slots, global_step."""
    values = {}
    for name, value in ema_values:
        if name in drop:
            continue
        if name in reshape:
            value = np.zeros([d + 1 for d in value.shape], np.float32)
        values[name] = value + raw_offset  # the raw weights differ from their averages
        values[f"{name}/ExponentialMovingAverage"] = value
        values[f"{name}/RMSProp"] = np.ones_like(value)
        values[f"{name}/RMSProp_1"] = np.zeros_like(value)
    graph = tf.Graph()
    with graph.as_default():
        var_list = {name: tf.compat.v1.Variable(value, name=f"v{i}") for i, (name, value) in enumerate(values.items())}
        var_list["global_step"] = tf.compat.v1.Variable(np.int64(1234), name="global_step")
        saver = tf.compat.v1.train.Saver(var_list=var_list)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            return saver.save(session, prefix)


@pytest.fixture(scope="module")
def authors_checkpoint(tmp_path_factory):
    source = randomized(build_efficientnet(SCOPE, num_classes=10, domains=("clean",),
                                           input_normalization="inception", **TINY), seed=1)
    names = authors_names(source)
    assert f"{SCOPE}/blocks_0/tpu_batch_normalization_1/gamma" in dict(names)  # block 0: expand ratio 1
    prefix = write_tf1_checkpoint(str(tmp_path_factory.mktemp("authors") / "model.ckpt"), names)
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    return source, names, prefix, pixels


def test_converted_checkpoint_reproduces_the_ema_network(authors_checkpoint, tmp_path):
    source, names, prefix, pixels = authors_checkpoint
    summary = convert(os.path.dirname(prefix), SCOPE, str(tmp_path / "ema"), inception_normalization=True, **TINY)
    assert f"({len(names)} from EMA shadows)" in summary
    assert "unused checkpoint variables (not optimizer slots): global_step" in summary
    converted, _, _, _ = load_trained(str(tmp_path / "ema"))
    assert converted.input_normalization == "inception"
    expected = source(pixels, training=False).numpy()
    np.testing.assert_allclose(converted(pixels, training=False).numpy(), expected, rtol=0, atol=1e-5)

    convert(prefix, SCOPE, str(tmp_path / "raw"), inception_normalization=True, use_ema=False, **TINY)
    raw_source = build_efficientnet(SCOPE, num_classes=10, domains=("clean",), input_normalization="inception", **TINY)
    values = dict(names)
    for name, variable in authors_variables(raw_source):
        variable.assign(values[name] + 0.5)  # what write_tf1_checkpoint stored as the raw weights
    raw, _, _, _ = load_trained(str(tmp_path / "raw"))
    np.testing.assert_allclose(raw(pixels, training=False).numpy(), raw_source(pixels, training=False).numpy(),
                               rtol=0, atol=1e-5)
    assert np.abs(raw(pixels, training=False).numpy() - expected).max() > 1e-3


def test_converted_directory_exports(authors_checkpoint, tmp_path):
    source, _, prefix, pixels = authors_checkpoint
    summary = convert(prefix, SCOPE, str(tmp_path / "out"), inception_normalization=True, export_saved_model=True, **TINY)
    export_dir = summary.rsplit("exported ", 1)[1].strip()
    loaded = tf.saved_model.load(export_dir)
    logits = loaded.signatures["predict_pixels"](pixels=tf.constant(pixels))["logits"].numpy()
    np.testing.assert_allclose(logits, source(pixels, training=False).numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("change, message", [
    ("drop", ("source", f"variable {SCOPE}/blocks_1/se/conv2d_1/bias is missing from the checkpoint")),
    ("reshape", ("source", f"variable {SCOPE}/head/conv2d/kernel has shape")),
    ("model", ("model", "{prefix} holds " + SCOPE + ", not efficientnet-b1")),
])
def test_bad_checkpoints_name_the_variable(authors_checkpoint, tmp_path, change, message):
    _, names, prefix, _ = authors_checkpoint
    model = SCOPE
    if change == "drop":
        prefix = write_tf1_checkpoint(str(tmp_path / "c" / "model.ckpt"), names, drop={f"{SCOPE}/blocks_1/se/conv2d_1/bias"})
    elif change == "reshape":
        prefix = write_tf1_checkpoint(str(tmp_path / "c" / "model.ckpt"), names, reshape={f"{SCOPE}/head/conv2d/kernel"})
    else:
        model = "efficientnet-b1"
    with pytest.raises(ConvertError) as error:
        convert(prefix, model, str(tmp_path / "out"), inception_normalization=True, **TINY)
    field, reason = message  # the library names the field; the CLI adds the "--" (test_cli_exits_2_with_one_line)
    assert error.value.field == field and error.value.reason.startswith(reason.format(prefix=prefix))
    assert not os.path.exists(tmp_path / "out" / "checkpoints")  # nothing written


def test_cli_exits_2_with_one_line(authors_checkpoint, tmp_path):
    _, _, prefix, _ = authors_checkpoint
    result = subprocess.run([sys.executable, "tools/convert_checkpoint.py", f"--source={prefix}",
                             "--model=efficientnet-b4", f"--output={tmp_path}/out"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("convert_checkpoint: error:")]
    assert lines == [f"convert_checkpoint: error: --model: {prefix} holds {SCOPE}, not efficientnet-b4"]


def bn_values(layer, domain):
    return {k: np.asarray(v) for k, v in layer.domain_variables(domain).items()}


def test_init_checkpoint_skips_the_head_and_copies_main_bn_into_aux(authors_checkpoint, tmp_path):
    source, _, prefix, _ = authors_checkpoint
    convert(prefix, SCOPE, str(tmp_path / "converted"), inception_normalization=True, **TINY)
    cfg = make_config(model_dir=str(tmp_path / "run"), dataset="synthetic", synthetic_examples=64, num_classes=4,
                      init_checkpoint=str(tmp_path / "converted"), init_skip_head=True, train_steps=1,
                      train_batch_size=8, seed=0, **TINY)
    trainer = Trainer(cfg)
    assert trainer.restore() == 0
    model = trainer.model
    assert model.domains == ("clean", "adv")
    for ours, theirs in zip(model.weighted_layers()[:-1], source.weighted_layers()[:-1]):
        if isinstance(ours, MultiBatchNormalization):
            for domain in ("clean", "adv"):  # the auxiliary BN starts as the main BN
                for key, value in bn_values(theirs, "clean").items():
                    np.testing.assert_array_equal(bn_values(ours, domain)[key], value)
        else:
            for a, b in zip(ours.weights, theirs.weights):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernel, bias = (np.asarray(w) for w in model.classifier.weights)
    assert kernel.shape == (source.classifier.kernel.shape[0], 4)
    assert np.all(bias == 0) and 0 < np.abs(kernel).max() <= 1 / np.sqrt(4)  # fresh dense init
    for shadow, variable in zip(trainer.ema.shadows, model.weights):  # the EMA starts from the init
        np.testing.assert_array_equal(np.asarray(shadow), np.asarray(variable))

    # Without --init_skip_head the class counts clash, named as such.
    with pytest.raises(InitError, match="init_skip_head"):
        initialize_from(build_efficientnet(SCOPE, num_classes=4, **TINY), str(tmp_path / "converted"))


def test_init_from_the_authors_checkpoint_directly(authors_checkpoint):
    source, names, prefix, pixels = authors_checkpoint
    model = build_efficientnet(SCOPE, num_classes=10, domains=("clean", "adv"), input_normalization="inception", **TINY)
    assert f"({SCOPE}, {len(names)} EMA values)" in initialize_from(model, prefix)
    np.testing.assert_allclose(model(pixels, training=False, domain="adv").numpy(),
                               source(pixels, training=False).numpy(), rtol=0, atol=1e-5)


def test_keras_weight_file_loads_with_imagenet_normalization(tmp_path):
    import keras

    keras_model = randomized(keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=7), 2)
    path = str(tmp_path / "efficientnetb0.weights.h5")
    keras_model.save_weights(path)
    model = build_efficientnet(SCOPE, num_classes=7, domains=("clean", "adv"), input_normalization="imagenet",
                               resolution=32)
    initialize_from(model, path)
    np.testing.assert_array_equal(np.asarray(model.classifier.kernel), np.asarray(keras_model.layers[-1].kernel))
    np.testing.assert_array_equal(np.asarray(model.stem_conv.kernel), np.asarray(keras_model.get_layer("stem_conv").kernel))
    head_bn = keras_model.get_layer("top_bn")
    np.testing.assert_array_equal(bn_values(model.head_bn, "adv")["moving_mean"], np.asarray(head_bn.moving_mean))
    with pytest.raises(InitError, match="^input_normalization: Keras applications weights expect ImageNet"):
        initialize_from(build_efficientnet(SCOPE, num_classes=7, input_normalization="inception", resolution=32), path)
    with pytest.raises(InitError, match="pass --init_skip_head"):
        initialize_from(build_efficientnet(SCOPE, num_classes=3, input_normalization="imagenet", resolution=32), path)
    fresh = build_efficientnet(SCOPE, num_classes=3, input_normalization="imagenet", resolution=32)
    initialize_from(fresh, path, skip_head=True)
    np.testing.assert_array_equal(np.asarray(fresh.stem_conv.kernel), np.asarray(keras_model.get_layer("stem_conv").kernel))


def test_a_checkpoint_holds_every_model_weight_not_only_what_the_optimizer_references(tmp_path):
    """Keras 3 hides list-held blocks and dict-held BN variables from tf.train.Checkpoint."""
    from advprop_tf.models.base import WeightsByPath
    from tests.helpers import tiny_model

    model, fresh = tiny_model(), tiny_model()
    rng = np.random.default_rng(0)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    path = tf.train.Checkpoint(model=model, model_weights=WeightsByPath(model)).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=fresh, model_weights=WeightsByPath(fresh)).read(path).assert_existing_objects_matched()
    for saved, restored in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy(), err_msg=saved.path)
