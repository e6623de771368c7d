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
from tests.helpers import as_users_run_it, run_train_command, small_model, synthetic_batches

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


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_backup_and_restore_resumes_an_interrupted_epoch_exactly(tmp_path, steps_per_execution):
    """2 epochs of 4 steps, interrupted after step 6 (inside epoch 2): the rerun ends with the weights of an
    uninterrupted fit, also when one call of Keras' train function runs 2 steps (it skips 2 batches a call).
    ModelCheckpoint and TensorBoard run alongside."""
    data = tf.data.Dataset.from_tensor_slices(
        tuple(np.stack(t) for t in zip(*synthetic_batches(8).take(4)))).unbatch().batch(8)

    def model():
        keras.utils.set_random_seed(0)
        m = AdvPropModel(to_multi_domain(small_model(dropout=0.3), input_normalization="inception"),
                         attack=AttackConfig(epsilon=2, num_steps=1, step_size=2, random_start=True), seed=1)
        m.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), steps_per_execution=steps_per_execution)
        return m

    straight = model()
    straight.fit(data, epochs=2, verbose=0)
    backup = str(tmp_path / "backup")
    callbacks = [keras.callbacks.BackupAndRestore(backup, save_freq=1), keras.callbacks.TensorBoard(str(tmp_path / "tb")),
                 keras.callbacks.ModelCheckpoint(str(tmp_path / "last.weights.h5"), save_weights_only=True)]
    interrupted = model()
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(data, epochs=2, verbose=0, callbacks=callbacks + [_Interrupt(6 // steps_per_execution)])
    assert interrupted.steps_done == 6
    resumed = model()
    resumed.fit(data, epochs=2, verbose=0, callbacks=callbacks)
    assert resumed.steps_done == 8
    for a, b in zip(straight.network.weights, resumed.network.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert tf.io.gfile.glob(str(tmp_path / "tb" / "train" / "events.*")) and os.path.exists(tmp_path / "last.weights.h5")


def test_weights_load_before_compile_and_sample_weights_are_refused(tmp_path):
    """load_weights() on a new AdvPropModel before compile() (a Keras user's order) restores the weights and the
    step counter; fit() refuses sample weights with a sentence instead of ignoring them."""
    def model():
        keras.utils.set_random_seed(0)
        return AdvPropModel(to_multi_domain(small_model(), input_normalization="inception"),
                            attack=AttackConfig(epsilon=1, num_steps=1))

    trained = model()
    trained.compile(optimizer=keras.optimizers.SGD(0.05))
    trained.fit(synthetic_batches(8).take(2), epochs=1, verbose=0)
    trained.save_weights(tmp_path / "trained.weights.h5")
    loaded = model()
    loaded.load_weights(tmp_path / "trained.weights.h5")
    assert loaded.steps_done == 2
    for a, b in zip(trained.network.weights, loaded.network.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.compile(optimizer=keras.optimizers.SGD(0.05))
    loaded.fit(synthetic_batches(8).take(1), epochs=1, verbose=0)
    assert loaded.steps_done == 3
    weighted = synthetic_batches(8).take(1).map(lambda x, y: (x, y, tf.ones_like(y, tf.float32)))
    with pytest.raises(ValueError, match="takes no sample_weight or class_weight"):
        loaded.fit(weighted, epochs=1, verbose=0)


def test_the_conversion_keeps_a_frozen_bn_frozen_and_its_regularizers_constraints_and_dtype_policy():
    """A fine-tuning recipe's frozen BN (trainable=False) stays frozen: inference statistics in training mode and
    no update from a fit step; a BN's gamma regularizer reaches the training loss, its constraint clips, its
    dtype policy stays."""
    keras.utils.set_random_seed(0)
    original = small_model()
    frozen = original.get_layer("bn0")
    frozen.trainable = False
    regularized = original.get_layer("bn1")
    regularized.beta_regularizer = keras.regularizers.L2(0.5)
    regularized.beta_constraint = keras.constraints.MaxNorm(0.01)
    frozen.moving_mean.assign(np.full(8, 0.3, np.float32))
    network = to_multi_domain(original, input_normalization="inception")
    bn0, bn1 = network.bn_layers()
    assert not bn0.trainable and bn1.trainable and bn0.dtype_policy.name == frozen.dtype_policy.name
    assert bn1.beta_regularizer is not None and isinstance(bn1.beta_constraint, keras.constraints.MaxNorm)
    pixels = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(network(pixels, training=True).numpy(), original(pixels / 127.5 - 1, training=True),
                               atol=5e-4 * np.abs(original(pixels / 127.5 - 1, training=True)).max())
    assert not any(v is w for layer in (bn0,) for d in bn0.domains for v in layer.domain_variables(d).values()
                   for w in network.trainable_variables)
    model = AdvPropModel(network, attack=AttackConfig(epsilon=1, num_steps=1))
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    for domain in bn1.domains:  # a beta far from 0: its L2 penalty and max-norm constraint must show
        bn1.domain_variables(domain)["beta"].assign(np.full(8, 0.2, np.float32))
    assert float(sum(network.losses)) == pytest.approx(2 * 0.5 * 8 * 0.2**2, rel=1e-5)  # both domains' betas
    model.fit(synthetic_batches(8).take(1), epochs=1, verbose=0)
    for domain in bn0.domains:
        np.testing.assert_array_equal(bn0.domain_variables(domain)["moving_mean"].numpy(), np.full(8, 0.3, np.float32))
    for domain in bn1.domains:
        assert np.linalg.norm(bn1.domain_variables(domain)["beta"].numpy()) <= 0.01 + 1e-6


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
    validation = synthetic_batches(16, split="validation", num_examples=32)
    scores = model.evaluate(validation, verbose=0, return_dict=True)
    assert set(scores) == {"loss", "accuracy"}
    images, labels = (np.concatenate(t) for t in zip(*[(x.numpy(), y.numpy()) for x, y in validation]))
    predicted = np.argmax(model.predict(images, verbose=0), -1)  # the main BN, as evaluate() is
    assert scores["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-6)
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
                            "--epsilon=1"],
                           cwd=REPO, capture_output=True, text=True, timeout=600, env=as_users_run_it())
    assert train.returncode == 0, train.stderr[-3000:]
    run = json.load(open(model_dir / "run_config.json"))
    assert run["model"]["model_name"] == "keras:MobileNetV2" and run["model"]["input_normalization"] == "inception"
    assert os.path.exists(model_dir / "export" / "1" / "saved_model.pb")
    # the evaluate command's library (its process is tested in test_evaluate), through the adversarial BN
    from absl import flags

    from advprop_tf import evaluate as evaluate_cli
    from advprop_tf.domains import CLEAN_IMAGES
    from advprop_tf.evaluation import results_table

    def cli_flags(*args):
        fv = flags.FlagValues()
        evaluate_cli.define_flags(fv)
        fv(["evaluate", *args])
        return fv

    evaluated, _ = evaluate_cli.run(cli_flags(f"--model_dir={model_dir}", "--domain=adv", "--batch_size=32",
                                              "--max_batches=1"), log=lambda line: None)
    assert evaluated["classifier"]["domain"] == "adv" and evaluated["classifier"]["ema"] and evaluated["examples"] == 32
    assert "clean top-1" in results_table(evaluated)
    # the main BN's EMA weights as the command evaluates them are the exported network's, image for image
    main, from_export = (evaluate_cli.run(cli_flags(*args, "--batch_size=32", "--max_batches=1"),
                                          log=lambda line: None)[0]
                         for args in ([f"--model_dir={model_dir}"],
                                      [f"--saved_model={model_dir / 'export' / '1'}", "--dataset=synthetic",
                                       "--synthetic_examples=64"]))
    assert main["classifier"]["ema"] and main["examples"] == from_export["examples"] == 32
    assert main[CLEAN_IMAGES] == pytest.approx(from_export[CLEAN_IMAGES], abs=1e-9)
    # the weight file's values reached the network (the BN statistics set above, before the 2 steps)
    from advprop_tf.training.trained import load_trained

    network = load_trained(str(model_dir)).model  # the EMA's weights, as evaluated and exported
    means = [layer.domain_variables("clean")["moving_mean"].numpy() for layer in network.bn_layers()]
    assert np.median([np.abs(m - 0.25).max() for m in means]) < 0.05  # 0-based without the file
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


def test_the_applications_table_trains_and_exports_efficientnet_at_the_default_flags_and_refuses_vgg(tmp_path):
    """The table of every constructor (docs/keras_applications.md), for two: Keras' EfficientNetB0 (an int64
    weight in its Normalization layer, which the EMA of the default flags once multiplied by its float decay)
    converts, trains 2 CLI steps with the EMA on and exports; VGG16 (no BN) is refused by the conversion and by
    the command line (exit 2, one line naming --model)."""
    out = tmp_path / "table.md"
    result = subprocess.run([sys.executable, "tools/keras_applications_table.py", "--names=EfficientNetB0,VGG16",
                             f"--output={out}"], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=as_users_run_it())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.read_text().splitlines() if line.startswith("| ") and "network" not in line}
    status, bns, diff, extra, _, size, trained, _ = rows["EfficientNetB0"]
    assert status == "converted" and int(bns) == 49 and float(diff) < 1e-4 and size == "32 px"
    assert int(extra.replace(",", "")) > 0  # what one more BN domain costs
    assert trained == "trained, exported"
    assert rows["VGG16"][0] == "refused" and "no BatchNormalization" in rows["VGG16"][5]
    assert rows["VGG16"][6] == ("exit 2: advprop_tf.train: error: --model: vgg16 has no BatchNormalization layer: "
                                "there is no BN to give each domain its own (AdvProp needs BNs)")
