"""Any Keras model with AdvProp: to_multi_domain, AdvPropModel.fit (the same step as the CLI's), plain-Keras models
back, callbacks, the CLI's keras:<name>, KerasHub. Tiny inputs, weights=None (downloads fail here)."""

import importlib
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.attacks.pgd import AttackConfig, pgd
from advprop_tf.methods import get_method
from advprop_tf.models.keras_conversion import ConversionError, preprocessing_of, to_multi_domain, walk
from advprop_tf.training.keras_model import AdvPropModel
from tests.helpers import run_train_command, small_model, synthetic_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BN_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")


def make_domains_differ(network, domain="adv", seed=0):
    rng = np.random.default_rng(seed)
    for layer in network.bn_layers():
        for key, v in layer.domain_variables(domain).items():
            low, high = {"gamma": (0.5, 1.5), "beta": (-0.3, 0.3), "moving_mean": (-0.5, 0.5),
                         "moving_variance": (0.5, 2.0)}[key]
            v.assign(rng.uniform(low, high, v.shape).astype("float32"))


@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2", "EfficientNetV2B0", "DenseNet121"])
def test_one_domain_of_a_converted_application_is_the_original(name):
    """Its preprocess_input inside, every BN copied: the same outputs in inference mode and with batch statistics."""
    constructor = getattr(keras.applications, name)
    keras.utils.set_random_seed(0)
    original = constructor(weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=None)
    for layer in walk(original):  # the masks would differ (Keras' generator vs the step's seeds)
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    network = to_multi_domain(original, input_normalization=preprocessing_of(constructor))
    assert network.domains == ("clean", "adv") and len(network.bn_layers()) == sum(
        isinstance(layer, keras.layers.BatchNormalization) for layer in walk(original))
    pixels = np.random.default_rng(1).uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    preprocessed = importlib.import_module(constructor.__module__).preprocess_input(pixels.copy())
    for training, kwargs in ((False, {}), (True, {"domain": "adv"})):
        want = original(preprocessed, training=training).numpy()
        got = network(pixels, training=training, **kwargs).numpy()
        # inference: identical up to float noise; batch statistics: TensorFlow's fused BN vs Keras' formula
        np.testing.assert_allclose(got, want, atol=(1e-5 if not training else 5e-4) * np.abs(want).max())


def test_a_model_without_bn_or_with_channels_first_bn_is_refused():
    plain = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                              keras.layers.Dense(2)], name="plain")
    with pytest.raises(ConversionError, match="plain has no BatchNormalization layer"):
        to_multi_domain(plain)
    channels_first = keras.Sequential([keras.Input((3, 8, 8)), keras.layers.BatchNormalization(axis=1),
                                       keras.layers.Flatten(), keras.layers.Dense(2)], name="cf")
    with pytest.raises(ConversionError, match="normalizes axis 1, not the channels"):
        to_multi_domain(channels_first)


def test_split_equals_routing_and_the_attack_goes_through_the_auxiliary_bn():
    network = to_multi_domain(small_model(), input_normalization="inception")
    make_domains_differ(network)
    x, y = next(iter(synthetic_batches(8)))
    clean = network(x, training=False, domain="clean").numpy()
    adv = network(x, training=False, domain="adv").numpy()
    assert np.abs(clean - adv).max() > 1e-2  # the two BNs really differ
    both = network(tf.concat([x, x], 0), training=False, domain=("clean", "adv")).numpy()
    np.testing.assert_allclose(both[:8], clean, atol=1e-5)
    np.testing.assert_allclose(both[8:], adv, atol=1e-5)
    # the method's attack: PGD through the auxiliary BN, not the main one
    from advprop_tf.methods import StepContext, attack
    from advprop_tf.training.optimization import make_loss_fn

    ctx = StepContext(loss_fn=make_loss_fn(10), attack=AttackConfig(epsilon=4, num_steps=2, step_size=2),
                      seed=tf.constant([1, 2]))
    made = attack(network, x, y, "adv", ctx).numpy()

    def through(domain):
        return pgd(lambda p: network(p, training=False, domain=domain, bn_mode="inference"), x, y, 4, 2, 2,
                   num_classes=10, seed=ctx.seed).numpy()

    np.testing.assert_allclose(made, through("adv"), atol=1e-4)
    assert np.abs(made - through("clean")).max() >= 1.0


def test_n_fit_steps_are_n_steps_of_the_cli_train_step():
    """One implementation: AdvPropModel.fit and TrainStep give the same weights on the same network and data."""
    from advprop_tf.training.step import StepConfig, TrainStep

    data = list(synthetic_batches(8).take(3))
    attack = AttackConfig(epsilon=2, num_steps=1, step_size=2, random_start=True)
    keras.utils.set_random_seed(0)
    original = small_model(dropout=0.3)
    fitted, stepped = (to_multi_domain(original, input_normalization="inception") for _ in range(2))
    model = AdvPropModel(fitted, "advprop", attack=attack, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.fit(tf.data.Dataset.from_tensor_slices(tuple(np.stack(t) for t in zip(*data))).unbatch().batch(8),
              epochs=1, verbose=0)
    step = TrainStep(stepped, get_method("advprop"), keras.optimizers.SGD(0.1, momentum=0.9),
                     StepConfig(global_batch_size=8, num_classes=10, attack=attack, seed=3, weight_decay=0.0))
    for x, y in data:
        step.run_batch(x, y)
    assert model.steps_done == step.current_step == 3
    # The same ops up to float round-off (fit divides by the batch size as a tensor; measured <= 3e-6); another
    # method, seed or domain routing moves these weights by 1e-2 and more.
    for a, b in zip(fitted.weights, stepped.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=2e-5, err_msg=a.path)
    assert not np.allclose(fitted.bn_layers()[0].domain_variables("adv")["moving_mean"].numpy(), 0)


PLAIN_KERAS_READER = r"""
import sys
import numpy as np
import keras
assert not any(m.startswith("advprop_tf") for m in sys.modules)
model = keras.saving.load_model(sys.argv[1])
print(np.abs(model(np.load(sys.argv[2]), training=False).numpy()).tolist())
"""


def test_the_plain_keras_inference_model_is_a_domain_and_loads_without_advprop_tf(tmp_path):
    network = to_multi_domain(small_model(), input_normalization="inception")
    make_domains_differ(network)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    preprocessed = x / 127.5 - 1.0  # what the original expects ("inception")
    for domain in ("clean", "adv"):
        plain = network.inference_model(domain)
        assert not any(type(layer).__name__ == "MultiBatchNormalization" for layer in walk(plain))
        np.testing.assert_allclose(plain(preprocessed, training=False).numpy(),
                                   network(x, training=False, domain=domain).numpy(), atol=1e-5)
    path = tmp_path / "robust.keras"
    network.inference_model("adv").save(path)
    np.save(tmp_path / "x.npy", preprocessed)
    out = subprocess.run([sys.executable, "-c", PLAIN_KERAS_READER, str(path), str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(json.loads(out.stdout.strip().splitlines()[-1]),
                               np.abs(network(x, training=False, domain="adv").numpy()), atol=1e-5)


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at:
            raise KeyboardInterrupt(f"interrupted after {self.at} steps")


def test_backup_and_restore_resumes_an_interrupted_epoch_exactly(tmp_path):
    """2 epochs of 4 steps, interrupted after step 6 (inside epoch 2): the rerun ends with the weights of an
    uninterrupted fit. ModelCheckpoint and TensorBoard run alongside."""
    data = tf.data.Dataset.from_tensor_slices(
        tuple(np.stack(t) for t in zip(*synthetic_batches(8).take(4)))).unbatch().batch(8)

    def model():
        keras.utils.set_random_seed(0)
        m = AdvPropModel(to_multi_domain(small_model(dropout=0.3), input_normalization="inception"),
                         attack=AttackConfig(epsilon=2, num_steps=1, step_size=2, random_start=True), seed=1)
        m.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        return m

    straight = model()
    straight.fit(data, epochs=2, verbose=0)
    backup = str(tmp_path / "backup")
    callbacks = [keras.callbacks.BackupAndRestore(backup, save_freq=1), keras.callbacks.TensorBoard(str(tmp_path / "tb")),
                 keras.callbacks.ModelCheckpoint(str(tmp_path / "last.weights.h5"), save_weights_only=True)]
    interrupted = model()
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(data, epochs=2, verbose=0, callbacks=callbacks + [_Interrupt(6)])
    assert interrupted.steps_done == 6
    resumed = model()
    resumed.fit(data, epochs=2, verbose=0, callbacks=callbacks)
    assert resumed.steps_done == 8
    for a, b in zip(straight.network.weights, resumed.network.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert tf.io.gfile.glob(str(tmp_path / "tb" / "train" / "events.*")) and os.path.exists(tmp_path / "last.weights.h5")


def test_fit_under_mirrored_strategy_and_the_main_bn_saved_model(tmp_path):
    from advprop_tf.serving import export_network
    from tests.helpers import two_cpu_strategy

    strategy = two_cpu_strategy()
    with strategy.scope():
        network = to_multi_domain(small_model(), input_normalization="inception")
        model = AdvPropModel(network, "fast_advprop", attack=AttackConfig(epsilon=1, num_steps=1))
        model.compile(optimizer=keras.optimizers.SGD(0.05))
    history = model.fit(synthetic_batches(16).take(3), epochs=1, verbose=0)
    assert {"clean_acc", "noisy_acc", "adv_acc", "loss"} <= set(history.history)
    assert model.steps_done == 3
    scores = model.evaluate(synthetic_batches(16, split="validation", num_examples=32), verbose=0, return_dict=True)
    assert set(scores) == {"loss", "accuracy"} and 0 <= scores["accuracy"] <= 1
    path = export_network(network, str(tmp_path / "export"), class_names=[f"c{i}" for i in range(10)])
    loaded = tf.saved_model.load(path)
    jpeg = tf.io.encode_jpeg(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).numpy()
    assert loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg]))["probabilities"].shape == (1, 10)
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded.signatures["predict_pixels"](pixels=tf.constant(x))["logits"].numpy(),
                               model.predict(x, verbose=0), atol=1e-5)


def test_the_cli_trains_evaluates_and_exports_a_keras_application(tmp_path, capsys):
    """--model=keras:MobileNetV2 with --keras_weights=<a file of that network> (a download is not possible here)."""
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 0.25, np.float32))
    base.save_weights(tmp_path / "mobilenet.weights.h5")
    model_dir = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "advprop_tf.train", f"--model_dir={model_dir}",
                            "--model=keras:MobileNetV2", f"--keras_weights={tmp_path / 'mobilenet.weights.h5'}",
                            "--resolution=32", "--dataset=synthetic", "--synthetic_examples=64", "--train_batch_size=8",
                            "--eval_batch_size=32", "--train_steps=2", "--steps_per_loop=2", "--optimizer=sgd",
                            "--lr_schedule=constant", "--base_learning_rate=0.01", "--warmup_epochs=0", "--seed=0",
                            "--ema_decay=0", "--epsilon=1"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    run = json.load(open(model_dir / "run_config.json"))
    assert run["model"]["model_name"] == "keras:MobileNetV2" and run["model"]["input_normalization"] == "inception"
    assert os.path.exists(model_dir / "export" / "1" / "saved_model.pb")
    # the evaluate command's library (its process is tested in test_evaluate), through the adversarial BN
    from absl import flags

    from advprop_tf import evaluate as evaluate_cli
    from advprop_tf.domains import CLEAN_IMAGES
    from advprop_tf.evaluation import results_table

    fv = flags.FlagValues()
    evaluate_cli.define_flags(fv)
    fv(["evaluate", f"--model_dir={model_dir}", "--domain=adv", "--batch_size=32", "--max_batches=1"])
    evaluated, _ = evaluate_cli.run(fv, log=lambda line: None)
    assert evaluated["classifier"]["domain"] == "adv" and 0 < evaluated["examples"] <= 32
    assert 0 <= evaluated[CLEAN_IMAGES]["top_1"] <= 1 and "clean top-1" in results_table(evaluated)
    # the weight file's values reached the network (the BN statistics set above, before the 2 steps)
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints" / "ckpt-2"))
    assert any(k.startswith("model_weights") for k in reader.get_variable_to_shape_map())
    code, stderr = run_train_command([f"--model_dir={tmp_path / 'x'}", "--model=keras:NoSuchNet"], capsys)
    assert code == 2 and "--model: keras.applications has no 'NoSuchNet'" in stderr


def test_a_keras_hub_backbone_from_a_preset_directory_converts_and_trains(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(32, 32, 3))
    backbone.save_to_preset(str(tmp_path / "preset"))
    loaded = keras_hub.models.Backbone.from_preset(str(tmp_path / "preset"))
    features = keras.layers.GlobalAveragePooling2D()(loaded.output)
    classifier = keras.Model(loaded.input, keras.layers.Dense(10)(features), name="hub_classifier")
    network = to_multi_domain(classifier, input_normalization="imagenet")
    assert len(network.bn_layers()) >= 3
    model = AdvPropModel(network, attack=AttackConfig(epsilon=1, num_steps=1))
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    before = [v.numpy().copy() for v in network.trainable_variables]
    model.fit(synthetic_batches(8).take(2), epochs=1, verbose=0)
    assert any(not np.allclose(a, v.numpy()) for a, v in zip(before, network.trainable_variables))


def test_the_applications_table_converts_one_network_and_refuses_one_without_bn(tmp_path):
    out = tmp_path / "table.md"
    result = subprocess.run([sys.executable, "tools/keras_applications_table.py", "--names=MobileNet,VGG16",
                             "--resolution=32", f"--output={out}"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.read_text().splitlines() if line.startswith("| ") and "network" not in line}
    status, bns, diff, extra = rows["MobileNet"][:4]
    assert status == "converted" and int(bns) == 27 and float(diff) < 1e-4
    assert int(extra.replace(",", "")) > 0  # what one more BN domain costs
    assert rows["VGG16"][0] == "refused" and "no BatchNormalization" in rows["VGG16"][-1]
