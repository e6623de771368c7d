"""ResNet-50 ... 638 with multi-domain BN: the authors' architecture, counts, routing, the registry end to end."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from advprop_tf.models import RESNET_NAMES, STAGE_DEPTHS, ResNet, build_model, model_from_config
from advprop_tf.serving import inference_network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torchvision's v1.5 counts (trainable) and Keras' count_params (+ each BN's moving mean and
# variance), 1000 classes, one BN set; BN channels per network.
COUNTS = {
    "resnet-50": (25_557_032, 25_610_152, 26_560),
    "resnet-101": (44_549_160, 44_654_504, 52_672),
    "resnet-152": (60_192_808, 60_344_232, 75_712),
}


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def tiny_resnet(domains=("clean", "adv"), **kwargs):
    kwargs.setdefault("width_coefficient", 0.125)
    kwargs.setdefault("depth_coefficient", 0.34)
    return build_model("resnet-50", num_classes=10, domains=domains, **kwargs)


@pytest.fixture(scope="module")
def resnet50_two_domains():
    return build_model("resnet-50", domains=("clean", "adv"))


@pytest.mark.parametrize("name", ["resnet-101", "resnet-152"])
def test_parameter_counts_equal_the_standard_v1_5_numbers(name):
    trainable, with_statistics, _ = COUNTS[name]
    model = build_model(name, domains=("clean",))
    assert trainable_count(model) == trainable
    assert model.count_params() == with_statistics


def test_each_extra_domain_adds_four_values_per_bn_channel_and_export_keeps_one_set(resnet50_two_domains):
    trainable, with_statistics, bn_channels = COUNTS["resnet-50"]
    model = resnet50_two_domains
    assert sum(layer.domain_variables("adv")["gamma"].shape[0] for layer in model.bn_layers()) == bn_channels
    assert model.count_params() == with_statistics + 4 * bn_channels
    assert trainable_count(model) == trainable + 2 * bn_channels
    exported = inference_network(model, "clean")
    assert exported.count_params() == with_statistics
    assert trainable_count(exported) == trainable
    assert not [v.path for v in exported.weights if "adv_" in v.path]


def test_stage_depths_give_the_named_number_of_layers():
    for name in RESNET_NAMES:
        # conv layers on the main path (stem + 3 per bottleneck) + the classifier
        assert 1 + 3 * sum(STAGE_DEPTHS[name]) + 1 == int(name.split("-")[1]), name
    assert STAGE_DEPTHS["resnet-50"] == (3, 4, 6, 3) and STAGE_DEPTHS["resnet-101"] == (3, 4, 23, 3)
    assert STAGE_DEPTHS["resnet-152"] == (3, 8, 36, 3) and STAGE_DEPTHS["resnet-200"] == (3, 24, 36, 3)
    deepest = ResNet("resnet-638", num_classes=10, domains=("clean",))  # layers only, no variables
    convs = [layer for layer in deepest.weighted_layers()
             if isinstance(layer, keras.layers.Conv2D) and "shortcut" not in layer.name]
    assert len(deepest.blocks) == 212 and len(convs) + 1 == 638


def test_blocks_are_the_authors_v1_5_bottlenecks(resnet50_two_domains):
    model = resnet50_two_domains
    first_of_stage2 = model.blocks[3]
    assert first_of_stage2.conv1.strides == (1, 1) and first_of_stage2.conv2.strides == (2, 2)
    assert first_of_stage2.shortcut_conv.strides == (2, 2) and first_of_stage2.projects
    assert not model.blocks[4].projects  # same shape: identity shortcut
    assert model.blocks[0].projects  # 64 -> 256 channels
    convs = [layer for layer in model.weighted_layers() if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 3 * 16 + 4 and all(not conv.use_bias for conv in convs)
    last_bns = {id(block.bn3) for block in model.blocks}
    for layer in model.bn_layers():
        assert (layer.momentum, layer.epsilon) == (0.9, 1e-5)
        for domain in ("clean", "adv"):
            gamma = layer.domain_variables(domain)["gamma"].numpy()
            np.testing.assert_array_equal(gamma, 0.0 if id(layer) in last_bns else 1.0)
    # He fan-out: std sqrt(2 / (k*k*filters)); final dense N(0, 0.01), zero bias.
    conv = model.blocks[10].conv2  # 3x3, 256 filters
    assert np.std(conv.kernel.numpy()) == pytest.approx(np.sqrt(2.0 / (9 * 256)), rel=0.02)
    assert np.std(model.classifier.kernel.numpy()) == pytest.approx(0.01, rel=0.02)
    np.testing.assert_array_equal(model.classifier.bias.numpy(), 0.0)


def test_weight_decay_covers_conv_and_dense_kernels_only():
    model = tiny_resnet()
    decayed = {v.path for v in model.weight_decay_variables()}
    assert decayed and all(path.endswith("/kernel") for path in decayed)
    assert model.classifier.kernel.path in decayed and model.classifier.bias.path not in decayed
    kernels = [v for v in model.trainable_variables if v.path.endswith("/kernel")]
    assert len(decayed) == len(kernels)


def differing_bns(model, seed=0):
    """Give the auxiliary BN other statistics and affine weights than the main one."""
    rng = np.random.default_rng(seed)
    for layer in model.bn_layers():
        for key, variable in layer.domain_variables("adv").items():
            shape = variable.shape
            value = {"gamma": rng.uniform(0.5, 1.5, shape), "beta": rng.normal(0, 0.3, shape),
                     "moving_mean": rng.normal(0, 0.5, shape), "moving_variance": rng.uniform(0.5, 2, shape)}[key]
            variable.assign(value.astype("float32"))
    return model


@pytest.mark.parametrize("training", [False, True])
def test_split_equals_routing_and_the_domains_differ(training):
    split = differing_bns(tiny_resnet())
    routed = model_from_config(split.get_config())
    routed.set_weights(split.get_weights())
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    b = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    together = split(np.concatenate([a, b]), training=training, domain=("clean", "adv"))
    alone = np.concatenate([routed(a, training=training, domain="clean"), routed(b, training=training, domain="adv")])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    through_main = routed(b, training=False, domain="clean")
    assert np.abs(through_main - routed(b, training=False, domain="adv")).max() > 1e-3


def test_step_schedule_follows_the_authors_recipe():
    from advprop_tf.training.optimization import make_schedule

    # batch 1024: lr 0.4, warm-up from 0.1 over 5 epochs, /10 at 35, 70, 95 (10 steps per epoch).
    schedule = make_schedule("step", 0.4, 10, 1100, warmup_epochs=5, decay_rate=0.1,
                             boundary_epochs=[35, 70, 95], warmup_from=0.1)
    values = {step: float(schedule(step)) for step in (0, 25, 50, 349, 350, 700, 950, 1099)}
    expected = {0: 0.1, 25: 0.25, 50: 0.4, 349: 0.4, 350: 0.04, 700: 0.004, 950: 0.0004, 1099: 0.0004}
    for step, value in expected.items():
        assert values[step] == pytest.approx(value, rel=1e-5), step
    restored = type(schedule).from_config(schedule.get_config())
    assert float(restored(700)) == pytest.approx(0.004)


@pytest.mark.parametrize("depth", [50, 101, 152, 200])
def test_configs_carry_the_authors_recipe(depth, tmp_path):
    from advprop_tf.train_flags import config_from_flags, define_train_flags

    fv = flags.FlagValues()
    define_train_flags(fv)
    fv(["train", f"--flagfile={REPO}/configs/resnet{depth}.flags", f"--data_dir={tmp_path}",
        f"--model_dir={tmp_path}/run"])
    config = config_from_flags(fv)
    assert config.method.domains.names == ("clean", "adv") and config.method.attack.steps == 1
    assert fv.model == f"resnet-{depth}" and fv.input_normalization == "imagenet"
    assert (fv.optimizer, fv.lr_schedule, fv.lr_decay_boundaries, fv.lr_decay_rate) == ("sgd", "step", ["35", "70", "95"], 0.1)
    assert (fv.base_learning_rate, fv.warmup_epochs, fv.train_epochs) == (0.1, 5, 110)
    assert (fv.weight_decay, fv.label_smoothing, fv.ema_decay) == (1e-4, 0.1, 0)
    assert (fv.method, fv.epsilon, fv.attack_steps, fv.attack_step_size) == ("advprop", 1, 1, 1)
    assert fv.targeted and fv.random_start and fv.attack_bn_mode == "inference"


def test_advprop_resnet_trains_evaluates_the_adv_bn_and_exports_one_bn_set(tmp_path):
    from advprop_tf import evaluation
    from advprop_tf.train import train_and_export
    from advprop_tf.train_flags import make_config

    cfg = make_config(
        model_dir=str(tmp_path), model="resnet-50", width_coefficient=0.125, depth_coefficient=0.34,
        dataset="synthetic", synthetic_examples=128, resolution=32, train_batch_size=8, eval_batch_size=64,
        train_steps=4, steps_per_loop=2, optimizer="sgd", lr_schedule="step", lr_decay_boundaries=["0.1"],
        lr_decay_rate=0.1, base_learning_rate=0.1, warmup_epochs=0.0, ema_decay=0.0, seed=3,
        shuffle_buffer=16, checkpoint_every_steps=4, random_start=True, epsilon=1.0,
    )
    trainer, export_path = train_and_export(cfg)
    assert trainer.model.model_name == "resnet-50" and trainer.model.input_normalization == "imagenet"
    assert trainer.results["step"] == 4
    saved = tf.saved_model.load(export_path)
    names = [name for name, _ in tf.train.list_variables(export_path + "/variables/variables")]
    saved_values = [n for n in names if "/.ATTRIBUTES/VARIABLE_VALUE" in n and "seed_generator" not in n]
    assert len(saved_values) == len(inference_network(trainer.model, "clean").weights) < len(trainer.model.weights)
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    clean = evaluation.classifier_from_model_dir(str(tmp_path), "clean")  # no EMA kept: raw weights
    robust = evaluation.classifier_from_model_dir(str(tmp_path), "adv")
    assert clean.description["ema"] is False
    from advprop_tf.training.trained import load_trained

    for trained, loaded in zip(trainer.model.weights, load_trained(str(tmp_path)).model.weights):
        np.testing.assert_array_equal(trained.numpy(), loaded.numpy(), err_msg=trained.path)  # BN statistics too
    np.testing.assert_allclose(saved.signatures["predict_pixels"](pixels=tf.constant(pixels))["logits"],
                               clean.logits_fn(pixels), rtol=1e-4, atol=1e-4)
    assert np.abs(clean.logits_fn(pixels) - robust.logits_fn(pixels)).max() > 0
