"""XLA (`jit_compile`) under every strategy: the compiled step equals the uncompiled one, for every method.

On a TPU every replicated step is compiled by XLA; on GPUs XLA is how EfficientNet gets its speed. Compiling
on the CPU is how an op that XLA (hence a TPU) cannot compile is caught here, before a TPU job is.

Tolerance: XLA fuses and reorders float32 arithmetic, so values agree to round-off, not bit for bit. One
step's gradients differ by ~1e-5 of the largest gradient (measured; 4e-5 at worst), so weights, BN statistics
and EMA shadows after two steps are compared to 2e-4 of each tensor's largest value. (A BN chunk of fewer
than 4 images amplifies round-off by orders of magnitude: variance of 2 samples at 1x1 resolution; the cases
here keep 4 or more per chunk.)
"""

import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.attacks.pgd import AttackConfig
from advprop_tf.methods import get_method
from advprop_tf.training.ema import ExponentialMovingAverage
from advprop_tf.training.optimization import make_optimizer, make_schedule
from advprop_tf.training.step import StepConfig, TrainStep
from tests.helpers import synthetic_batches, tiny_network, two_cpu_strategy


def keras_seed(seed):
    import keras

    keras.utils.set_random_seed(seed)

BATCH = 16  # per replica; domain chunks of 8, Fast AdvProp's attacked share 4
TOLERANCE = 2e-4
FAST_ATTACK = dict(targeted=False, random_start=True, attack_bn_mode="batch")

# name: (method, domains, StepConfig options, whether the batch carries an input view)
CASES = {
    "vanilla": ("vanilla", ("clean",), {}, False),
    "adversarial": ("adversarial", ("clean",), {}, False),
    "mixed": ("mixed", ("clean",), {}, False),
    "advprop": ("advprop", ("clean", "adv"), {}, False),
    "n_domain": ("advprop", ("clean", "autoaugment", "adv"), {}, True),
    "fine_grained_bns": ("advprop", ("clean", "adv1", "adv2"), {}, False),
    "epsilon_schedule": ("advprop", ("clean", "adv"), dict(epsilon_schedule=((0.0, 1.0), (0.5, 2.0))), False),
    "fast_advprop": ("fast_advprop", ("clean", "adv"), dict(adv_fraction=0.25, adv_weight=0.5), False),
}


def build(case, strategy, jit, policy_loss_scaling=False, skip_non_finite=False):
    method, domains, options, _ = CASES[case]
    attack = dict(epsilon=2.0, num_steps=2, step_size=1.0, random_start=True, prob_start_from_clean=0.0)
    if method == "fast_advprop":
        attack.update(FAST_ATTACK, epsilon=1.0, num_steps=1)
    with strategy.scope():
        model = tiny_network(domains=domains, dropout_rate=0.2)
        optimizer = make_optimizer("rmsprop", make_schedule("constant", 0.01, 10, 10, 0), model,
                                   loss_scaling=policy_loss_scaling, skip_non_finite=skip_non_finite)
        ema = ExponentialMovingAverage(model, 0.5)
        config = StepConfig(global_batch_size=BATCH * strategy.num_replicas_in_sync, num_classes=10, total_steps=2,
                            attack=AttackConfig(**attack), seed=7, jit_compile=jit, **options)
        return model, ema, TrainStep(model, get_method(method), optimizer, config, strategy, ema)


def batches(case, strategy):
    with_view = CASES[case][3]
    ds = synthetic_batches(BATCH * strategy.num_replicas_in_sync, size=16)
    if with_view:
        ds = ds.map(lambda x, y: ({"clean": x, "autoaugment": 255.0 - x}, y))
    return iter(strategy.experimental_distribute_dataset(ds) if strategy.num_replicas_in_sync > 1 else ds)


def state(model, ema):
    return [v.numpy() for v in model.weights], [s.numpy() for s in ema.shadows]


def assert_close(a, b, what):
    for x, y, path in zip(a[0], b[0], what):
        np.testing.assert_allclose(x, y, rtol=TOLERANCE, atol=TOLERANCE * max(1.0, np.abs(x).max()), err_msg=path)
    for x, y, path in zip(a[1], b[1], what):
        np.testing.assert_allclose(x, y, rtol=TOLERANCE, atol=TOLERANCE * max(1.0, np.abs(x).max()),
                                   err_msg=f"EMA of {path}")


# On one replica XLA compiles the whole replica step of every case. On two it compiles the compute part
# only (step.py), the same code under a replica context: the cases that route the batch differently run
# there (n_domain: several BNs and an input view; fast_advprop: a method that computes its own gradients);
# the rest add compile time only.
ON_TWO_REPLICAS = ("n_domain", "fast_advprop")
SHAPES = [(case, 1) for case in CASES] + [(case, 2) for case in ON_TWO_REPLICAS]


@pytest.mark.parametrize("case, replicas", SHAPES, ids=[f"{case}-{replicas}" for case, replicas in SHAPES])
def test_an_xla_step_equals_the_uncompiled_step(case, replicas):
    strategy = tf.distribute.get_strategy() if replicas == 1 else two_cpu_strategy()
    results = []
    for jit in (False, True):
        model, ema, step = build(case, strategy, jit)
        data = batches(case, strategy)
        sums = [step.run_batch(*next(data)) for _ in range(2)][-1]  # one trace, two steps (the schedule moves)
        results.append((state(model, ema), {k: float(v) for k, v in sums.items()}, model))
    (plain, plain_sums, model), (compiled, compiled_sums, _) = results
    assert step.current_step == 2 and plain_sums["non_finite"] == 0
    assert_close(plain, compiled, [v.path for v in model.weights])
    assert plain_sums.keys() == compiled_sums.keys()
    for key, value in plain_sums.items():
        assert compiled_sums[key] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), key
    # every domain's statistics moved (the comparison covers updated values, not untouched ones)
    moved = {d for layer in model.bns for d in layer.domains
             if not np.allclose(layer.domain_variables(d)["moving_mean"].numpy(), 0.0)}
    assert moved == set(model.domains)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_xla_under_the_mixed_precision_policies(policy):
    """float16 (with loss scaling, and Fast AdvProp's own backward passes) and bfloat16 compile and agree with the
    uncompiled step: after two steps each weight's change from its initial value agrees to 15% of that change
    (measured: 2% in float16, 5% in bfloat16), and every trainable weight moved. An absolute tolerance would
    pass a compiled step that did not update at all: two steps move a weight by ~1e-3."""
    import keras

    keras.mixed_precision.set_global_policy(policy)
    case = "fast_advprop" if policy == "mixed_float16" else "advprop"
    strategy = tf.distribute.get_strategy()
    runs = []
    for jit in (False, True):
        model, ema, step = build(case, strategy, jit, policy_loss_scaling=policy == "mixed_float16")
        initial = [v.numpy().copy() for v in model.weights]
        sums = step.run_loop(batches(case, strategy), tf.constant(2))
        runs.append((state(model, ema), float(sums["loss"])))
    assert np.isfinite(runs[0][1]) and runs[1][1] == pytest.approx(runs[0][1], rel=1e-3)
    trainable = {id(v) for v in model.trainable_variables}
    for x, y, start, variable in zip(runs[0][0][0], runs[1][0][0], initial, model.weights):
        moved = np.abs(x - start).max()
        assert moved > 0 or id(variable) not in trainable, f"{variable.path} did not move"
        np.testing.assert_allclose(y - start, x - start, rtol=0, atol=0.15 * moved, err_msg=variable.path)


def replica_values(variables, strategy):
    return [[np.array(x) for x in strategy.experimental_local_results(v)] for v in variables]


# A flat gray image (128 on the inception scale is ~0) has almost no variance for the BNs to divide by: its float16
# gradients overflow from a loss scale of 2**16 (measured: 2**15 does not), the synthetic images' only from 2**18.
FLAT_GRAY = 128.0


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_a_step_that_fails_on_the_second_replica_only_is_skipped_by_both(precision):
    """float16: replica 1's GRADIENTS overflow while both losses stay finite (Keras' LossScaleOptimizer judges by
    replica 0's); float32 --on_nan=skip: replica 1's loss is NaN. Both replicas skip (every replica's copy of
    every weight, statistic and EMA shadow unchanged and finite), the loss scale halves once, the learning-rate
    schedule's step follows the step counter; compiled or not."""
    import keras

    float16 = precision == "float16"
    keras.mixed_precision.set_global_policy("mixed_float16" if float16 else "float32")
    strategy = two_cpu_strategy()
    for jit in (False, True):
        model, ema, step = build("advprop", strategy, jit, policy_loss_scaling=float16, skip_non_finite=not float16)
        x, y = next(iter(synthetic_batches(2 * BATCH, size=16)))
        if float16:
            step.optimizer.dynamic_scale.assign(2.0**17)
            failing = tf.fill([BATCH, 16, 16, 3], FLAT_GRAY)
        else:
            failing = tf.tensor_scatter_nd_update(x[BATCH:], [[0, 0, 0, 0]], [float("nan")])
        data = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors((tf.concat([x[:BATCH], failing], 0), y)))
        tracked = model.weights + ema.shadows
        before = replica_values(tracked, strategy)
        sums = step.run_batch(*next(iter(data)))
        for a, b in zip(before, replica_values(tracked, strategy)):
            for on_replica_a, on_replica_b in zip(a, b):
                np.testing.assert_array_equal(on_replica_a, on_replica_b)
                assert np.isfinite(on_replica_b).all()
        assert float(sums["non_finite"]) == 1, "exactly one replica failed"
        assert np.isfinite(float(sums["loss"])) == float16  # float16: both replicas' losses were finite
        assert float(step.optimizer.dynamic_scale.numpy()) == (2.0**16 if float16 else 1.0)
        assert step.current_step == 1 and int(step.optimizer.iterations.numpy()) == 1  # one clock
        # the next, healthy step is applied on both replicas
        skipped = replica_values(model.trainable_variables, strategy)
        healthy = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, y)))
        assert float(step.run_batch(*next(iter(healthy)))["non_finite"]) == 0
        after = replica_values(model.trainable_variables, strategy)
        assert all(np.isfinite(v).all() for per_replica in after for v in per_replica)
        assert any(not np.array_equal(a[0], b[0]) for a, b in zip(skipped, after))
        assert int(step.optimizer.iterations.numpy()) == step.current_step == 2


@pytest.mark.parametrize("name, method, compared", [("efficientnet-b0", "advprop", True),
                                                     ("resnet-50", "fast_advprop", False)])
def test_the_whole_replica_step_of_our_networks_compiles_runs_and_equals_the_uncompiled_one(name, method, compared):
    """Attack, forward, backward, optimizer update and EMA as ONE XLA computation (as on a TPU) for the reduced
    EfficientNet and ResNet (an op without an XLA kernel fails here), run for two steps: the weights that move
    uncompiled move compiled, all finite; EfficientNet's every trainable weight moves, its change agreeing with
    the uncompiled step's to 5% of that change. ResNet's is not compared: its blocks' last BN starts at gamma 0 (the authors' init), so the input
    gradients the attack takes the sign of are mostly round-off at step 0 and XLA's other summation order flips
    them (measured: ResNet vanilla agrees to 3e-4 of the change, AdvProp to 7%, Fast AdvProp not at all)."""
    from advprop_tf.models import build_model

    strategy = tf.distribute.get_strategy()
    runs = []
    for jit in (False, True):
        keras_seed(0)
        model = build_model(name, num_classes=10, domains=("clean", "adv"), width_coefficient=0.25,
                            depth_coefficient=0.25, resolution=32, dropout_rate=0.2, drop_connect_rate=0.2)
        optimizer = make_optimizer("rmsprop", make_schedule("constant", 0.01, 10, 10, 0), model)
        attack = AttackConfig(epsilon=1, num_steps=1, **(FAST_ATTACK if method == "fast_advprop" else {}))
        step = TrainStep(model, get_method(method), optimizer, StepConfig(global_batch_size=8, num_classes=10,
                         attack=attack, jit_compile=jit, seed=3), strategy, ExponentialMovingAverage(model, 0.9))
        if jit:
            hlo = step._replica_part.experimental_get_compiler_ir(*next(iter(synthetic_batches(8))))(stage="hlo")
            assert hlo.count("convolution(") >= 3 * sum("conv" in v.path and "kernel" in v.path
                                                        for v in model.trainable_variables)  # fwd + 2 bwd each
        initial = [v.numpy().copy() for v in model.weights]
        data = iter(synthetic_batches(8))
        for _ in range(2):
            step.run_batch(*next(data))
        runs.append([v.numpy() for v in model.weights])
    trainable = {id(v) for v in model.trainable_variables}
    moved_plain, moved_compiled = set(), set()
    for x, y, start, variable in zip(*runs, initial, model.weights):
        assert np.isfinite(y).all(), variable.path
        moved = np.abs(x - start).max()
        if moved > 0:
            moved_plain.add(variable.path)
        if np.abs(y - start).max() > 0:
            moved_compiled.add(variable.path)
        if compared:
            assert moved > 0 or id(variable) not in trainable, f"{variable.path} did not move"
            np.testing.assert_allclose(y - start, x - start, rtol=0, atol=0.05 * moved + 1e-7, err_msg=variable.path)
    # (ResNet: a block's branch before its gamma-0 BN gets no gradient at step 0, the same ones either way)
    assert moved_compiled == moved_plain and len(moved_plain) > len(trainable) // 2
