"""Fast AdvProp (Mei et al., ICLR 2022): the attacked share, its BN, the reused gradients, the budget."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.attacks.pgd import AttackConfig, epsilon_ball, random_start, sign_step
from advprop_tf.methods import (
    StepContext,
    attacked_count,
    fast_advprop_budget_scale,
    get_method,
)
from advprop_tf.training.optimization import make_loss_fn
from tests.helpers import synthetic_batches, tiny_model

NO_DROPOUT = dict(dropout_rate=0.0, drop_connect_rate=0.0)
FAST_ATTACK = dict(epsilon=1.0, num_steps=1, step_size=1.0, targeted=False, random_start=True,
                   attack_bn_mode="batch")


def context(clean_weight=1.0, noisy_weight=0.5, adv_weight=0.5, adv_fraction=0.2, seed=(3, 4), **attack):
    return StepContext(loss_fn=make_loss_fn(10, 0.1), attack=AttackConfig(**{**FAST_ATTACK, **attack}),
                       seed=tf.constant(seed, tf.int32), clean_weight=clean_weight, adv_weight=adv_weight,
                       adv_fraction=adv_fraction, noisy_weight=noisy_weight)


def batch(n=10, seed=0):
    return next(iter(synthetic_batches(n, split="validation", num_examples=n, seed=seed)))


def distinct_domains_model():
    """Auxiliary BN gamma/beta and statistics unlike the main BN's: routing to the wrong BN shows."""
    model = tiny_model(**NO_DROPOUT)
    rng = np.random.default_rng(0)
    for layer in model.bn_layers():
        for key, v in layer.domain_variables("adv").items():
            shift = rng.uniform(0.5, 1.5, v.shape) if key in ("gamma", "moving_variance") else rng.normal(0, .3, v.shape)
            v.assign(shift.astype(np.float32))
    return model


class RecordedCalls:
    """Wraps model.call to record what each forward pass is given."""

    def __init__(self, model):
        self.calls = []
        original = model.call

        def call(inputs, training=None, domain=None, bn_mode=None):
            self.calls.append(dict(inputs=np.array(inputs), training=training, domain=domain, bn_mode=bn_mode))
            return original(inputs, training=training, domain=domain, bn_mode=bn_mode)

        model.call = call


@pytest.mark.parametrize("size,fraction,attacked", [(10, 0.2, 2), (32, 0.2, 6), (2, 0.2, 1), (10, 0.99, 9), (40, 0.25, 10)])
def test_attacked_count_is_p_adv_of_the_batch_with_at_least_one_of_each(size, fraction, attacked):
    assert attacked_count(size, fraction) == attacked


def test_exactly_p_adv_of_the_batch_is_attacked_and_goes_through_the_auxiliary_bn():
    model = distinct_domains_model()
    recorded = RecordedCalls(model)
    x, y = batch(10)
    _, _, metrics = get_method("fast_advprop")(model, x, y, context())
    clean, noisy, adversarial = recorded.calls
    # the 8 clean images untouched through the main BN, in training mode
    assert clean["domain"] == "clean" and clean["training"] and clean["bn_mode"] is None
    np.testing.assert_array_equal(clean["inputs"], x.numpy()[:8])
    # the last 2 at a random start through the auxiliary BN with batch statistics
    assert noisy["domain"] == "adv" and noisy["training"] and noisy["bn_mode"] == "batch"
    assert 0 < np.abs(noisy["inputs"] - x.numpy()[8:]).max() <= 1.0 + 1e-4
    # then the adversarial copies of those 2 images, auxiliary BN, training mode
    assert adversarial["domain"] == "adv" and adversarial["training"] and adversarial["bn_mode"] is None
    assert adversarial["inputs"].shape[0] == 2
    assert np.abs(adversarial["inputs"] - x.numpy()[8:]).max() <= 1.0 + 1e-4
    assert not np.allclose(adversarial["inputs"], noisy["inputs"])
    counts = {k: float(tf.reduce_sum(v)) for k, v in metrics.items() if k.endswith("_examples")}
    assert counts == {"clean_examples": 8.0, "noisy_examples": 2.0, "adv_examples": 2.0}


def test_each_bn_updates_its_statistics_only_from_its_own_images():
    """Main BN: the clean part; auxiliary BN: the adversarial pass only (the attack's pass writes nothing)."""
    model = distinct_domains_model()
    reference = distinct_domains_model()
    reference.set_weights(model.get_weights())
    recorded = RecordedCalls(model)
    x, y = batch(10)
    get_method("fast_advprop")(model, x, y, context())
    adversarial = recorded.calls[2]["inputs"]
    reference(x[:8], training=True, domain="clean")
    reference(adversarial, training=True, domain="adv")
    for got, want in zip(model.weights, reference.weights):
        if "moving" in got.path:
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6, err_msg=got.path)
    # had the attack's pass written back, the auxiliary statistics would differ
    leaky = distinct_domains_model()
    leaky.set_weights(model.get_weights())
    before = [v.numpy() for v in leaky.weights if "/adv_moving_mean" in v.path]
    leaky(recorded.calls[1]["inputs"], training=True, domain="adv")
    after = [v.numpy() for v in leaky.weights if "/adv_moving_mean" in v.path]
    assert not all(np.allclose(a, b) for a, b in zip(before, after))


def reference_gradients(model, x, y, ctx, num_clean):
    """Fast AdvProp's update written out term by term, each term with its own tape."""
    loss_fn = ctx.loss_fn
    variables = model.trainable_variables

    def grads_of(fn, watch=None):
        with tf.GradientTape() as tape:
            if watch is not None:
                tape.watch(watch)
            loss = tf.reduce_sum(fn())
        return tape.gradient(loss, variables + ([watch] if watch is not None else []))

    clean, attacked = x[:num_clean], x[num_clean:]
    g_clean = grads_of(lambda: loss_fn(y[:num_clean], model(clean, training=True, domain="clean")))
    x0 = random_start(attacked, ctx.attack.epsilon, ctx.seed, ctx.attack.prob_start_from_clean)
    *g_noisy, g_x = grads_of(lambda: loss_fn(y[num_clean:], model(x0, training=True, domain="adv", bn_mode="batch")), x0)
    lower, upper = epsilon_ball(attacked, ctx.attack.epsilon)
    x_adv = sign_step(x0, g_x, ctx.attack.step_size, lower, upper)
    g_adv = grads_of(lambda: loss_fn(y[num_clean:], model(x_adv, training=True, domain="adv")))
    num_adv = x.shape[0] - num_clean
    shared = num_clean * ctx.clean_weight + num_adv * (ctx.noisy_weight + ctx.adv_weight)
    domain_of = {id(v): d for layer in model.bn_layers() for d in layer.domains
                 for k, v in layer.domain_variables(d).items() if k in ("gamma", "beta")}
    expected = []
    for v, gc, gn, ga in zip(variables, g_clean, g_noisy, g_adv):
        zero = tf.zeros_like(v)
        total = ctx.clean_weight * (zero if gc is None else gc) + ctx.noisy_weight * (zero if gn is None else gn) \
            + ctx.adv_weight * (zero if ga is None else ga)
        count = {"clean": num_clean * ctx.clean_weight,
                 "adv": num_adv * (ctx.noisy_weight + ctx.adv_weight)}.get(domain_of.get(id(v)), shared)
        expected.append(total / count)
    return expected


@pytest.mark.parametrize("weights", [(1.0, 0.5, 0.5), (1.0, 0.25, 1.0)])
def test_reused_gradients_equal_the_update_computed_by_hand(weights):
    """The attack's parameter gradients are part of the update, weighted clean:noisy:adv, and each group
    (shared, main BN, auxiliary BN) is divided by the weighted count of the examples that reached it."""
    clean_weight, noisy_weight, adv_weight = weights
    model = distinct_domains_model()
    twin = distinct_domains_model()
    twin.set_weights(model.get_weights())
    x, y = batch(10)
    ctx = context(clean_weight, noisy_weight, adv_weight)
    _, grads, _ = get_method("fast_advprop")(model, x, y, ctx)
    expected = reference_gradients(twin, x, y, ctx, num_clean=8)
    # float32 round-off is ~1e-5 of the largest gradient (seen on BN betas whose true gradient is 0)
    tolerance = 1e-5 * max(float(tf.reduce_max(tf.abs(g))) for g in expected)
    for v, got, want in zip(model.trainable_variables, grads, expected):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-3, atol=tolerance, err_msg=v.path)
    # each group's own BN parameters to 1e-3 relative: a wrong loss weight or group count is off by >= 20%
    for name in ("stem_bn/clean_gamma", "stem_bn/adv_gamma", "head_bn/clean_beta", "head_bn/adv_beta"):
        i = next(i for i, v in enumerate(model.trainable_variables) if v.path.endswith(name))
        error = np.linalg.norm(np.asarray(grads[i]) - expected[i].numpy()) / np.linalg.norm(expected[i].numpy())
        assert error < 1e-3, (name, error)
    # the BN groups are NOT normalized like the shared weights: divided by the shared count instead of their
    # own, each would be off by its factor (main BN 8 w_c / shared, auxiliary BN 2 (w_n + w_a) / shared)
    shared = 8 * clean_weight + 2 * (noisy_weight + adv_weight)
    for name, own in (("stem_bn/clean_gamma", 8 * clean_weight), ("stem_bn/adv_gamma", 2 * (noisy_weight + adv_weight))):
        i = next(i for i, v in enumerate(model.trainable_variables) if v.path.endswith(name))
        got, want = np.asarray(grads[i]), expected[i].numpy()
        as_if_shared = want * own / shared
        assert np.linalg.norm(want) > 0
        assert np.linalg.norm(got - want) < 1e-3 * np.linalg.norm(want) < np.linalg.norm(got - as_if_shared), name


def _backward_ops(fn):
    graph = tf.function(fn).get_concrete_function().graph
    counts = collections.Counter(op.type for op in graph.get_operations())
    return {k: counts[k] for k in ("Conv2DBackpropFilter", "Conv2DBackpropInput",
                                   "DepthwiseConv2dNativeBackpropFilter", "DepthwiseConv2dNativeBackpropInput")}


def test_the_attack_backward_pass_is_the_update_backward_pass():
    """Three batches (clean, noisy, adversarial), three backward passes: the attack's input gradient and
    the noisy view's parameter gradients come from ONE pass, not an input-only pass plus another."""
    model = tiny_model(**NO_DROPOUT)
    x, y = batch(10)
    ctx = context()
    variables = model.trainable_variables

    def vanilla():
        with tf.GradientTape() as tape:
            loss, _ = get_method("vanilla")(model, x, y, ctx)
        return tape.gradient(loss, variables)

    def fast():
        return get_method("fast_advprop")(model, x, y, ctx)[1]

    def naive():
        """The attack's input gradient thrown away, the noisy view's gradients computed again."""
        x0 = random_start(x[8:], 1.0, ctx.seed)
        with tf.GradientTape() as tape:
            tape.watch(x0)
            attack_loss = tf.reduce_sum(ctx.loss_fn(y[8:], model(x0, training=True, domain="adv", bn_mode="batch")))
        x_adv = tf.stop_gradient(x0 + tf.sign(tape.gradient(attack_loss, x0)))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(ctx.loss_fn(y[:8], model(x[:8], training=True, domain="clean")))
            loss += tf.reduce_sum(ctx.loss_fn(y[8:], model(x0, training=True, domain="adv", bn_mode="batch")))
            loss += tf.reduce_sum(ctx.loss_fn(y[8:], model(x_adv, training=True, domain="adv")))
        return tape.gradient(loss, variables)

    one_pass = _backward_ops(vanilla)
    assert one_pass["Conv2DBackpropFilter"] > 0 and one_pass["DepthwiseConv2dNativeBackpropInput"] > 0
    assert _backward_ops(fast) == {k: 3 * n for k, n in one_pass.items()}
    wasteful = _backward_ops(naive)
    assert wasteful["Conv2DBackpropInput"] > 3 * one_pass["Conv2DBackpropInput"]


def test_several_attack_steps_each_add_their_gradients_and_the_budget_follows():
    model = tiny_model(**NO_DROPOUT)
    recorded = RecordedCalls(model)
    x, y = batch(10)
    _, grads, metrics = get_method("fast_advprop")(model, x, y, context(epsilon=2.0, num_steps=3))
    assert len(recorded.calls) == 5  # clean, three attack passes, the adversarial pass
    assert [c["bn_mode"] for c in recorded.calls] == [None, "batch", "batch", "batch", None]
    assert all(np.isfinite(np.asarray(g)).all() for g in grads if g is not None)
    assert fast_advprop_budget_scale(0.2, 1) == pytest.approx(1.2)
    assert fast_advprop_budget_scale(0.2, 3) == pytest.approx(1.6)


def test_the_epochs_and_the_schedule_are_divided_by_the_budget_scale():
    from advprop_tf.train_flags import make_config
    from advprop_tf.training import builders

    class Source:
        def num_examples(self, split):
            return 1200

    common = dict(train_batch_size=32, train_epochs=12.0, warmup_epochs=6.0, lr_decay_epochs=2.4,
                  base_learning_rate=0.016, model_dir="/tmp/unused")
    vanilla = builders.training_length(make_config(method="vanilla", **common), Source())
    fast = builders.training_length(make_config(method="fast_advprop", **common), Source())
    stronger = builders.training_length(make_config(method="fast_advprop", epsilon=2.0, **common), Source())
    unmatched = builders.training_length(make_config(method="fast_advprop", match_vanilla_budget=False, **common),
                                         Source())
    # an epoch is 1200 images read: vanilla 37 steps of 32, fast_advprop 30 steps of 32 clean + 8 attacked
    assert (vanilla.steps_per_epoch, fast.steps_per_epoch) == (37, 30)
    # 12 epochs of 30 steps / (0.2 x 1 + 1) = 300; PGD-3 (epsilon 2): / (0.2 x 3 + 1) = 225
    assert (vanilla.total_steps, fast.total_steps, stronger.total_steps, unmatched.total_steps) == (444, 300, 225, 360)
    # the warm-up and the decay period shrink with the run: the schedule keeps its shape
    model = tiny_model(domains=("clean", "adv"))
    schedule, _, _ = builders.build_optimization(make_config(method="fast_advprop", **common), model, fast)
    peak = 0.016 * 32 / 256  # the learning rate follows the clean batch, as the authors' 0.1 at 256
    # warm-up 6 epochs of 30 steps / 1.2 = 150 steps (unscaled: 180); decay every 2.4 x 30 / 1.2 = 60 steps
    assert float(schedule(75)) == pytest.approx(peak * 75 / 150, rel=1e-5)
    assert float(schedule(179)) == pytest.approx(peak * 0.97 ** 2, rel=1e-5)
    assert float(schedule(180)) == pytest.approx(peak * 0.97 ** 3, rel=1e-5)


def test_the_attacked_images_come_on_top_of_the_clean_batch_as_in_the_authors_loader():
    """Their --train-batch 256 with 4:1 reads 256 clean + 64 attacked images; the budget follows the fraction
    actually attacked."""
    from advprop_tf.train_flags import make_config
    from advprop_tf.methods import loaded_batch_size
    from advprop_tf.training import builders

    cfg = make_config(method="fast_advprop", train_batch_size=256, model_dir="/tmp/unused")
    assert builders.images_per_replica(cfg, 8) == 40 and attacked_count(40, 0.2) == 8  # 8 x (32 + 8) = 320
    assert builders.budget_scale(cfg, 8) == pytest.approx(1.2)
    odd = make_config(method="fast_advprop", train_batch_size=208, model_dir="/tmp/unused")  # 26 clean per replica
    assert builders.images_per_replica(odd, 8) == 33 and attacked_count(33, 0.2) == 7
    assert builders.budget_scale(odd, 8) == pytest.approx(7 / 33 + 1)  # not the nominal 0.2
    for fraction in (0.1, 0.2, 0.25, 0.5, 0.9):
        for clean in range(1, 300):
            loaded = loaded_batch_size(clean, fraction)
            assert loaded - attacked_count(loaded, fraction) == clean, (clean, fraction)


def test_fast_advprop_trains_under_mirrored_strategy_with_ema_checkpoint_and_main_bn_export(tmp_path):
    from advprop_tf.train import train_and_export
    from advprop_tf.train_flags import make_config
    from tests.helpers import two_cpu_strategy

    cfg = make_config(
        model_dir=str(tmp_path), method="fast_advprop", dataset="synthetic", synthetic_examples=128,
        width_coefficient=0.25, depth_coefficient=0.25, resolution=32, train_batch_size=20, eval_batch_size=32,
        train_steps=4, steps_per_loop=2, optimizer="sgd", lr_schedule="constant", base_learning_rate=0.2,
        warmup_epochs=0.0, seed=0, ema_decay=0.5, checkpoint_every_steps=2, **NO_DROPOUT)
    trainer, export_path = train_and_export(cfg, two_cpu_strategy())
    assert trainer.train_step.current_step == 4 and trainer.results["examples"] == trainer.source.num_examples("validation")
    stats = {v.path: v.numpy() for v in trainer.model.weights}
    assert not np.allclose(stats["efficientnet_b0/stem_bn/adv_moving_mean"], 0.0)  # the adversarial pass wrote it
    names = [name for name, _ in tf.train.list_variables(export_path + "/variables/variables")]
    assert any("Sclean_gamma/" in n for n in names) and not any("Sadv_" in n for n in names)
    exported = tf.saved_model.load(export_path)
    x, _ = batch(4)
    trainer.ema.swap()
    want = trainer.model(x, training=False).numpy()
    trainer.ema.swap()
    got = exported.signatures["predict_pixels"](pixels=tf.constant(x))["logits"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
