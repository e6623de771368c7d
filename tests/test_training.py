"""The training loop: strategies, resume, summaries, eval, bad flags (interruptions: test_interruptions.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.train_flags import make_config
from advprop_tf.errors import ConfigError
from advprop_tf.training.loop import Trainer, run_training
from tests.helpers import run_train_command, synthetic_batches, two_cpu_strategy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny, fast, deterministic run on the synthetic set. The network is a reduced ResNet-50 (5 bottleneck
# blocks): a 3-step run of it takes 20 s alone against 26 s for the reduced EfficientNet-B0. These files
# test the loop, whatever the network; EfficientNet runs through it in the README's demo (test_readme.py),
# the shared `trained` run of the export and evaluation tests (conftest.py) and Fast AdvProp's two-replica
# run (test_fast_advprop.py).
TINY = dict(
    model="resnet-50", dataset="synthetic", synthetic_examples=256, width_coefficient=0.25,
    depth_coefficient=0.25, resolution=32, train_batch_size=8, eval_batch_size=64, train_steps=6,
    steps_per_loop=3,
    optimizer="sgd", lr_schedule="constant", base_learning_rate=0.5, warmup_epochs=0.0,
    epsilon=2.0, attack_step_size=1.0, dropout_rate=0.0, drop_connect_rate=0.0, seed=1,
    ema_decay=0.99, shuffle_buffer=64, checkpoint_every_steps=3,
)


def tiny_config(model_dir, **overrides):
    return make_config(model_dir=str(model_dir), **{**TINY, **overrides})


def weights(trainer):
    return [v.numpy().copy() for v in trainer.model.weights]


def bn_stats(trainer, domain):
    return np.concatenate([v.numpy().ravel() for v in trainer.model.weights if f"/{domain}_moving_mean" in v.path])


def test_mirrored_loop_trains_advprop_on_two_logical_cpus(tmp_path):
    strategy = two_cpu_strategy()
    trainer = Trainer(tiny_config(tmp_path, train_steps=4, steps_per_loop=2, export=False), strategy)
    assert strategy.num_replicas_in_sync == 2
    initial_clean, initial_adv = bn_stats(trainer, "clean"), bn_stats(trainer, "adv")
    sums = {k: float(v) for k, v in trainer.train_step.run_loop(trainer.train_iterator, tf.constant(2)).items()}
    assert np.isfinite(sums["loss"]) and sums["non_finite"] == 0
    assert sums["examples"] == 2 * 8  # two steps of the global batch
    trainer.results = trainer.run()
    assert trainer.train_step.current_step == 4
    assert not np.allclose(bn_stats(trainer, "clean"), initial_clean)
    assert not np.allclose(bn_stats(trainer, "adv"), initial_adv)
    assert trainer.results["examples"] == trainer.source.num_examples("validation")


def test_a_graph_loop_traces_the_step_once_and_sums_every_step(monkeypatch):
    """One trace (and under XLA one compile) of the step per graph loop, not one for a first step outside it."""
    from advprop_tf.training.step import TrainStep
    from tests.helpers import train_tiny

    traces = []
    compute = TrainStep._compute

    def counted(self, *args):
        traces.append(1)
        return compute(self, *args)

    monkeypatch.setattr(TrainStep, "_compute", counted)
    _, step = train_tiny("advprop", steps=3, batch_size=8)
    assert len(traces) == 1 and step.current_step == 3
    sums = step.run_loop(iter(synthetic_batches(8)), tf.constant(4))
    assert len(traces) == 1 and step.current_step == 7
    assert float(sums["examples"]) == 4 * 8 and {"clean_loss", "adv_loss", "loss"} <= set(sums)


def test_two_replicas_on_different_data_equal_a_reference_composed_from_their_per_replica_steps():
    """Two replicas, each on its OWN half of the batch, against a reference composed on one device from the two
    per-replica computations (step._compute on each half): the gradients summed (each replica's loss is scaled by
    the global batch; the weight decay counted once), the BN statistics averaged (the MEAN aggregation of the
    moving statistics), one optimizer update. Unsynchronized BN: each replica's batch statistics are its own
    half's, which the same data on both replicas could not tell from replica 0's. The attack is untargeted without
    random start (per-replica random targets would differ)."""
    import keras

    from advprop_tf.attacks.pgd import AttackConfig
    from advprop_tf.methods import get_method
    from advprop_tf.training.optimization import make_optimizer, make_schedule, weight_decay_loss
    from advprop_tf.training.step import StepConfig, TrainStep
    from tests.helpers import tiny_model

    def make(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(3)
            model = tiny_model(dropout_rate=0.0, drop_connect_rate=0.0)
            optimizer = make_optimizer("rmsprop", make_schedule("constant", 0.01, 10, 10, 0), model)
            config = StepConfig(global_batch_size=16, num_classes=10, weight_decay=1e-3,
                                attack=AttackConfig(epsilon=2, num_steps=2, step_size=1, targeted=False))
            return model, optimizer, TrainStep(model, get_method("advprop"), optimizer, config, strategy)

    mirrored = two_cpu_strategy()
    reference, optimizer, reference_step = make(tf.distribute.get_strategy())
    model_2, _, step_2 = make(mirrored)
    for a, b in zip(reference.weights, model_2.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    batches = list(synthetic_batches(8).take(4))
    for step in range(2):
        halves = batches[2 * step: 2 * step + 2]  # replica 0's, replica 1's: different images and labels
        assert not np.array_equal(halves[0][0].numpy(), halves[1][0].numpy())
        per_replica = [reference_step._compute(x, y, tf.constant(step, tf.int64)) for x, y in halves]
        with tf.GradientTape() as tape:
            decay = weight_decay_loss(reference, 1e-3)
        decay_grads = tape.gradient(decay, reference.trainable_variables)
        grads = [None if a is None else a + b - (0 if d is None else d)
                 for a, b, d in zip(per_replica[0][0], per_replica[1][0], decay_grads)]
        for key in per_replica[0][1]:
            reference_step._statistics[int(key)].assign((per_replica[0][1][key] + per_replica[1][1][key]) / 2)
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, reference.trainable_variables) if g is not None])
        distributed = mirrored.experimental_distribute_values_from_function(lambda ctx, h=halves: h[ctx.replica_id_in_sync_group])
        sums = step_2.run_batch(*distributed)
        expected_loss = sum(float(p[2]["loss"]) for p in per_replica) - float(decay)  # decay counted once
        assert float(sums["loss"]) == pytest.approx(expected_loss, rel=1e-4)
    for a, b in zip(reference.weights, model_2.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-5, err_msg=a.path)
    assert step_2.current_step == 2


def test_mirrored_sync_bn_step_equals_default_strategy():
    """With synchronized BN, two replicas on different halves == one device on the whole batch.

    The two-BN Keras network of the conversion tests keeps the tracing of a step with an all-reduce in
    every BN call short (tiny_model has ~20 BNs: 150 s on two loaded cores); EfficientNet's flag is checked
    to reach each of its BNs."""
    import keras

    from advprop_tf.attacks.pgd import AttackConfig
    from advprop_tf.methods import get_method
    from advprop_tf.models.keras_conversion import to_multi_domain
    from advprop_tf.training.optimization import make_optimizer, make_schedule
    from advprop_tf.training.step import StepConfig, TrainStep
    from tests.helpers import small_model, tiny_model

    assert all(layer.synchronized for layer in tiny_model(synchronized_bn=True).bn_layers())

    def make(strategy, sync):
        with strategy.scope():
            keras.utils.set_random_seed(4)
            model = to_multi_domain(small_model(synchronized_bn=sync), input_normalization="inception")
            assert all(layer.synchronized == sync for layer in model.bn_layers())
            optimizer = make_optimizer("rmsprop", make_schedule("constant", 0.01, 10, 10, 0), model)
            config = StepConfig(global_batch_size=16, num_classes=10,
                                attack=AttackConfig(epsilon=2, num_steps=2, step_size=1, targeted=False))
            return model, TrainStep(model, get_method("advprop"), optimizer, config, strategy)

    mirrored = two_cpu_strategy()
    model_1, step_1 = make(tf.distribute.get_strategy(), False)
    model_2, step_2 = make(mirrored, True)
    batches = list(synthetic_batches(16).take(2))
    for x, y in batches:
        step_1.run_batch(x, y)
    for batch in mirrored.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(
            (tf.stack([b[0] for b in batches]), tf.stack([b[1] for b in batches]))).unbatch().batch(16)):
        step_2.run_batch(*batch)
    # the attack runs on each replica's half with inference-mode BN: identical too
    for a, b in zip(model_1.weights, model_2.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-5, err_msg=a.path)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A finished 4-step run: the resume test's reference and the summaries test's subject."""
    model_dir = tmp_path_factory.mktemp("straight")
    return model_dir, run_training(tiny_config(model_dir, train_steps=4, steps_per_loop=2, export=False))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, straight):
    _, straight = straight
    first = run_training(tiny_config(tmp_path / "resumed", train_steps=2, steps_per_loop=2, export=False))
    assert first.train_step.current_step == 2
    resumed = run_training(tiny_config(tmp_path / "resumed", train_steps=4, steps_per_loop=2, export=False))
    assert resumed.train_step.current_step == 4
    # Same seed, same data order (the iterator position is in the checkpoint), same
    # attack seeds (derived from the step): the weights agree up to float noise.
    for a, b in zip(weights(straight), weights(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(straight.ema.shadows, resumed.ema.shadows):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_eval_results_and_summaries_are_written(straight):
    model_dir, trainer = straight
    results = json.load(open(model_dir / "eval_results.json"))
    assert results["step"] == 4 and results["domain"] == "clean" and results["ema"] is True
    assert 0.0 <= results["top_1"] <= results["top_5"] <= 1.0
    assert results["examples"] == trainer.source.num_examples("validation")
    events = tf.io.gfile.glob(str(model_dir / "train" / "events.*"))
    assert events
    tags = set()
    for record in tf.compat.v1.train.summary_iterator(events[0]):
        for value in record.summary.value:
            tags.add(value.tag)
    assert {"loss", "learning_rate", "images_per_second", "clean/accuracy", "adv/accuracy", "adv/loss"} <= tags
    stats = json.load(open(model_dir / "train_stats.json"))
    assert stats["finished"] and stats["steps"] == stats["total_steps"] == 4
    assert stats["train_seconds"] > stats["steady_seconds"] > 0 and stats["images_per_second"] > 0


BAD_FLAGS = [
    (["--model=efficientnet-b9"], "--model: unknown model 'efficientnet-b9'"),
    (["--epsilon=-1"], "--epsilon: must be >= 0, got -1"),
    (["--train_batch_size=7", "--num_gpus=0"], None),  # checked below with two replicas in-process
    (["--dataset=folder"], "--data_dir: --dataset=folder needs a location"),
    (["--dataset=folder:/nonexistent/images"], "--dataset: '/nonexistent/images' does not exist"),
    (["--dataset=imagenet"], "--dataset: unknown data source 'imagenet'"),
    (["--method=vanilla", "--epsilon_schedule=0:1"], "--epsilon_schedule: contradicts --method=vanilla"),
    (["--mixed_precision=float16", "--tpu=local"], "--mixed_precision: float16 is for GPUs"),
    (["--epsilon=abc"], "flag --epsilon=abc"),
    (["--dropout_rate=1.5"], "--dropout_rate: must be in [0, 1), got 1.5"),
    (["--no_such_flag=1"], "no_such_flag"),
]


@pytest.mark.parametrize("extra,message", [b for b in BAD_FLAGS if b[1]])
def test_bad_flags_exit_2_with_one_line(tmp_path, extra, message, capsys):
    code, stderr = run_train_command([f"--model_dir={tmp_path}", *extra], capsys)
    assert code == 2, stderr[-2000:]
    lines = [l for l in stderr.splitlines() if l.startswith("advprop_tf.train: error:")]
    assert len(lines) == 1 and message in lines[0], stderr[-2000:]
    assert not os.path.exists(tmp_path / "checkpoints")


def test_the_command_itself_exits_2_with_one_line_naming_the_flag(tmp_path):
    """The installed entry point, as a process: the same one line, and status 2."""
    result = subprocess.run(
        [sys.executable, "-m", "advprop_tf.train", f"--model_dir={tmp_path}", "--epsilon=-1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "advprop_tf.train: error: --epsilon: must be >= 0, got -1"
    assert not os.path.exists(tmp_path / "checkpoints")


def test_empty_folder_source_exits_2(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    code, stderr = run_train_command([f"--model_dir={tmp_path / 'run'}", f"--dataset=folder:{tmp_path / 'images'}"],
                                     capsys)
    assert code == 2
    assert "has no class sub-folders" in stderr


def test_batch_not_divisible_by_replicas(tmp_path):
    with pytest.raises(ConfigError, match="^train_batch_size: 7 is not divisible by the 2 replicas"):
        Trainer(tiny_config(tmp_path, train_batch_size=7), two_cpu_strategy())


@pytest.mark.parametrize("method", ["advprop", "fast_advprop"])
def test_float16_training_step_uses_loss_scaling(method):
    """mixed_float16: float32 variables, a LossScaleOptimizer, finite loss, weights move (fast_advprop
    scales each of its own backward passes)."""
    import keras

    from advprop_tf.attacks.pgd import AttackConfig
    from advprop_tf.methods import FAST_ADVPROP_ATTACK, get_method
    from advprop_tf.training.optimization import make_optimizer, make_schedule
    from advprop_tf.training.step import StepConfig, TrainStep
    from tests.helpers import tiny_model

    keras.mixed_precision.set_global_policy("mixed_float16")
    model = tiny_model()
    optimizer = make_optimizer("rmsprop", make_schedule("constant", 0.01, 10, 10, 0), model, loss_scaling=True)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    attack = AttackConfig(epsilon=2, num_steps=1, **({} if method == "advprop" else dict(FAST_ADVPROP_ATTACK)))
    step = TrainStep(model, get_method(method), optimizer,
                     StepConfig(global_batch_size=8, num_classes=10, attack=attack))
    before = [v.numpy().copy() for v in model.trainable_variables]
    x, y = next(iter(synthetic_batches(8)))
    # Dynamic loss scaling starts at 2**15: float16 gradients overflow and those
    # steps are skipped while the scale halves, until updates go through.
    for _ in range(20):
        sums = step.run_batch(x, y)
        assert np.isfinite(float(sums["loss"]))
        if not all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables)):
            break
    else:
        pytest.fail("no update went through in 20 float16 steps")
    assert float(optimizer.dynamic_scale) < 2.0**15
    assert all(v.dtype == "float32" for v in model.weights)


def test_fewer_model_classes_than_the_data_has_is_an_error_naming_both(tmp_path):
    from tests.test_cloud_storage import write_image_folder

    write_image_folder(str(tmp_path / "images"), per_class=2)  # 3 classes
    with pytest.raises(ConfigError, match=r"^num_classes: 2 is fewer than the 3 classes of --dataset=folder:"):
        Trainer(tiny_config(tmp_path / "run", dataset=f"folder:{tmp_path / 'images'}", num_classes=2))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    # more model classes than data classes stays allowed (a subset of a larger label set)
    trainer = Trainer(tiny_config(tmp_path / "run", dataset=f"folder:{tmp_path / 'images'}", num_classes=5))
    assert trainer.num_classes == 5 and trainer.model.num_classes == 5


def test_a_model_dir_that_is_a_file_is_a_flag_error(tmp_path):
    from advprop_tf.training.run_dir import RunDirError

    (tmp_path / "run").write_text("a file")
    with pytest.raises(RunDirError, match=r"^model_dir: .* is a file, not a directory"):
        Trainer(tiny_config(tmp_path / "run"))


def test_every_replica_draws_its_own_seeds_at_every_step_of_a_pod():
    """4096 replicas x 1000 steps: no two (replica, step) share a seed pair (counter x 1024 + replica did from
    1025 replicas on), the pair the train step and the evaluation hand the attack, dropout and corruptions."""
    from advprop_tf.randomness import replica_seed

    replicas, steps = np.meshgrid(np.arange(4096, dtype=np.int32), np.arange(1000, dtype=np.int32), indexing="ij")
    pairs = np.ascontiguousarray(replica_seed(5, steps, replicas).numpy().reshape(-1, 2))
    assert len(np.unique(pairs.view(np.int64))) == 4096 * 1000
    assert replica_seed(5, 7, 0).numpy().tolist() == [5, 7]  # one device draws what it always drew


def test_a_run_without_a_validation_split_still_exports_and_says_why_it_did_not_evaluate(tmp_path, capsys):
    """A folder of images at the default --holdout_fraction=0 has no validation split: training ends, the export
    is written all the same, and the last line says that no evaluation ran and why."""
    from tests.test_data import write_image

    root = tmp_path / "images"
    for c, name in enumerate(["ant", "bee"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            write_image(root / name / f"{i}.jpg", tf.cast(tf.random.stateless_uniform([40, 40, 3], (c, i), 0, 255),
                                                          tf.uint8))
    model_dir = tmp_path / "run"
    flags = [f"--{k}={v}" for k, v in {**TINY, "dataset": f"folder:{root}", "train_steps": 2, "steps_per_loop": 2,
                                       "checkpoint_every_steps": 2}.items() if k != "synthetic_examples"]
    code, stderr, stdout = run_train_command([f"--model_dir={model_dir}", *flags], capsys, with_stdout=True)
    assert code in (0, None), stderr[-2000:]  # absl's app.run exits with main's None
    assert os.path.exists(model_dir / "export" / "1" / "saved_model.pb")
    assert not os.path.exists(model_dir / "eval_results.json")
    assert stdout.rstrip().splitlines()[-1] == (
        f"final: trained to step 2; no evaluation (--dataset=folder:{root} has no validation split); "
        f"exported to {model_dir / 'export' / '1'}")
