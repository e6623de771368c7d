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
                            attack=AttackConfig(**attack), seed=7, jit_compile=jit,
                            skip_non_finite=skip_non_finite, **options)
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
    uncompiled step to their precision."""
    import keras

    keras.mixed_precision.set_global_policy(policy)
    case = "fast_advprop" if policy == "mixed_float16" else "advprop"
    strategy = tf.distribute.get_strategy()
    runs = []
    for jit in (False, True):
        model, ema, step = build(case, strategy, jit, policy_loss_scaling=policy == "mixed_float16")
        sums = step.run_loop(batches(case, strategy), tf.constant(2))
        runs.append((state(model, ema), float(sums["loss"])))
    assert np.isfinite(runs[0][1]) and runs[1][1] == pytest.approx(runs[0][1], rel=2e-2)
    for x, y in zip(runs[0][0][0], runs[1][0][0]):
        np.testing.assert_allclose(x, y, rtol=5e-2, atol=5e-2 * max(1.0, np.abs(x).max()))


def test_the_non_finite_skip_holds_under_xla_on_two_replicas():
    """A NaN on ONE replica: both replicas skip (weights, statistics, EMA unchanged), compiled or not."""
    strategy = two_cpu_strategy()
    for jit in (False, True):
        model, ema, step = build("advprop", strategy, jit, skip_non_finite=True)
        x, y = next(iter(synthetic_batches(2 * BATCH, size=16)))
        poisoned = tf.tensor_scatter_nd_update(x, [[BATCH, 0, 0, 0]], [float("nan")])  # the second replica's half
        data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((poisoned, y)))
        before = state(model, ema)
        sums = step.run_batch(*next(iter(data)))
        assert float(sums["non_finite"]) == 1 and step.current_step == 1
        after = state(model, ema)
        for a, b in zip(before[0] + before[1], after[0] + after[1]):
            np.testing.assert_array_equal(a, b)


def test_the_whole_replica_step_compiles_for_our_networks():
    """Attack, forward, backward, optimizer update and EMA as ONE XLA computation (as on a TPU), lowered for the
    reduced EfficientNet and ResNet: an op without an XLA kernel fails here."""
    from advprop_tf.models import build_model

    strategy = tf.distribute.get_strategy()
    for name, method in (("efficientnet-b0", "advprop"), ("resnet-50", "fast_advprop")):
        model = build_model(name, num_classes=10, domains=("clean", "adv"), width_coefficient=0.25,
                            depth_coefficient=0.25, resolution=32, dropout_rate=0.2, drop_connect_rate=0.2)
        optimizer = make_optimizer("rmsprop", make_schedule("constant", 0.01, 10, 10, 0), model)
        attack = AttackConfig(epsilon=1, num_steps=1, **(FAST_ATTACK if method == "fast_advprop" else {}))
        step = TrainStep(model, get_method(method), optimizer, StepConfig(global_batch_size=8, num_classes=10,
                         attack=attack, jit_compile=True), strategy, ExponentialMovingAverage(model, 0.9))
        x, y = next(iter(synthetic_batches(8)))
        hlo = step._replica_part.experimental_get_compiler_ir(x, y)(stage="hlo")
        assert "ENTRY" in hlo and "convolution" in hlo
        assert step.current_step == 0  # lowered, not run
