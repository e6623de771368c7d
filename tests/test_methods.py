"""Training methods: which BN sees which images, which BN gets gradients, schedules, learning."""

import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.attacks.pgd import AttackConfig
from advprop_tf.errors import ConfigError
from advprop_tf.methods import (
    StepContext,
    attack,
    get_method,
    parse_epsilon_schedule,
    scheduled_epsilon,
)
from advprop_tf.training.optimization import make_loss_fn
from tests.helpers import accuracy, synthetic_batches, tiny_model, train_tiny

NO_DROPOUT = dict(dropout_rate=0.0, drop_connect_rate=0.0)


def context(seed=(1, 2), **attack_kwargs):
    attack_kwargs.setdefault("epsilon", 4)
    attack_kwargs.setdefault("num_steps", 2)
    attack_kwargs.setdefault("step_size", 2)
    return StepContext(loss_fn=make_loss_fn(10, 0.1), attack=AttackConfig(**attack_kwargs),
                       seed=tf.constant(seed, tf.int32))


def batch(n=8, seed=0):
    x, y = next(iter(synthetic_batches(n, split="validation", num_examples=n, seed=seed)))
    return x, y


def moving_stats(model, domain):
    return {v.path: v.numpy().copy() for v in model.weights if f"/{domain}_moving" in v.path}


def twin_models(domains=("clean", "adv")):
    a = tiny_model(domains=domains, **NO_DROPOUT)
    b = tiny_model(domains=domains, **NO_DROPOUT)
    b.set_weights(a.get_weights())
    return a, b


@pytest.mark.parametrize("attack_bn_mode", ["batch", "inference"])
def test_advprop_updates_each_bn_only_from_its_half(attack_bn_mode):
    model, reference = twin_models()
    x, y = batch()
    ctx = context(attack_bn_mode=attack_bn_mode)
    get_method("advprop")(model, x, y, ctx)
    # reference: same attack (no side effects), then each half alone through its BN
    adv = attack(reference, x, y, "adv", ctx)
    reference(x, training=True, domain="clean")
    reference(adv, training=True, domain="adv")
    for domain in ("clean", "adv"):
        got, want = moving_stats(model, domain), moving_stats(reference, domain)
        for path in want:
            np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    # and the adversarial half is not the clean half: the two BNs saw different data
    clean_only, _ = twin_models()
    clean_only(x, training=True, domain="adv")
    path = next(p for p in moving_stats(model, "adv") if "stem_bn" in p and "variance" in p)
    assert not np.allclose(moving_stats(model, "adv")[path], moving_stats(clean_only, "adv")[path])


@pytest.mark.parametrize("name", ["mixed", "adversarial", "vanilla"])
def test_single_bn_methods_never_touch_the_auxiliary_bn(name):
    model = tiny_model(**NO_DROPOUT)
    before = moving_stats(model, "adv")
    aux_vars = [v for v in model.trainable_variables if "/adv_" in v.path]
    x, y = batch()
    with tf.GradientTape() as tape:
        loss, metrics = get_method(name)(model, x, y, context())
    grads = tape.gradient(loss, aux_vars)
    assert all(g is None for g in grads)
    after = moving_stats(model, "adv")
    for path in before:
        np.testing.assert_array_equal(before[path], after[path])
    assert np.isfinite(loss.numpy())
    assert set(metrics) >= ({"adv_loss", "adv_correct"} if name != "vanilla" else {"clean_loss"})


def test_advprop_gradients_reach_the_auxiliary_bn():
    model = tiny_model(**NO_DROPOUT)
    aux_vars = [v for v in model.trainable_variables if "/adv_" in v.path]
    x, y = batch()
    with tf.GradientTape() as tape:
        loss, metrics = get_method("advprop")(model, x, y, context())
    grads = tape.gradient(loss, aux_vars)
    assert all(g is not None for g in grads)
    assert sum(float(tf.reduce_sum(tf.abs(g))) for g in grads) > 0
    assert set(metrics) == {"clean_loss", "clean_correct", "adv_loss", "adv_correct"}


def test_advprop_loss_is_clean_plus_weighted_adversarial():
    model = tiny_model(**NO_DROPOUT)
    x, y = batch()
    ctx = context()
    ctx.adv_weight = 0.5
    total, m = get_method("advprop")(model, x, y, ctx)
    np.testing.assert_allclose(total.numpy(), m["clean_loss"].numpy().sum() + 0.5 * m["adv_loss"].numpy().sum(), rtol=1e-5)


def test_mixed_uses_one_bn_for_the_whole_clean_plus_adv_batch():
    model, reference = twin_models()
    x, y = batch()
    ctx = context()
    get_method("mixed")(model, x, y, ctx)
    adv = attack(reference, x, y, "clean", ctx)
    reference(tf.concat([x, adv], 0), training=True, domain="clean")
    for path, want in moving_stats(reference, "clean").items():
        np.testing.assert_allclose(moving_stats(model, "clean")[path], want, rtol=1e-5, atol=1e-6)


def test_n_domain_advprop_routes_each_view_to_its_own_bn():
    domains = ("clean", "autoaugment", "adv")
    model, reference = twin_models(domains)
    x, y = batch()
    augmented = 255.0 - x  # any different view of the same images
    ctx = context()
    total, metrics = get_method("advprop")(model, {"clean": x, "autoaugment": augmented}, y, ctx)
    assert {"clean_loss", "autoaugment_loss", "adv_loss"} <= set(metrics)
    adv = attack(reference, x, y, "adv", ctx)
    for images, domain in ((x, "clean"), (augmented, "autoaugment"), (adv, "adv")):
        reference(images, training=True, domain=domain)
    for domain in domains:
        for path, want in moving_stats(reference, domain).items():
            np.testing.assert_allclose(moving_stats(model, domain)[path], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs the input view 'autoaugment'"):
        get_method("advprop")(model, x, y, ctx)


def test_epsilon_schedule_parsing_and_values():
    schedule = parse_epsilon_schedule("0:1, 0.5:2, 0.8:4")
    assert schedule == [(0.0, 1.0), (0.5, 2.0), (0.8, 4.0)]
    values = [float(scheduled_epsilon(schedule, s, 100)) for s in (0, 49, 50, 79, 80, 99)]
    assert values == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    for bad, message in (("0.5:1", "start at fraction 0"), ("0:1,0.6:2,0.3:3", "must increase"),
                         ("0:x", "not 'fraction:epsilon'"), ("0:-1", "negative"), ("0:1,1.2:2", "not in")):
        with pytest.raises(ValueError, match=message):
            parse_epsilon_schedule(bad)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'trades'.*vanilla, advprop, adversarial, mixed"):
        get_method("trades")


def test_attack_config_validation():
    with pytest.raises(ConfigError, match="^epsilon: must be >= 0, got -1"):
        AttackConfig(epsilon=-1)
    with pytest.raises(ConfigError, match="^attack_bn_mode: "):
        AttackConfig(attack_bn_mode="train")
    with pytest.raises(ConfigError, match="^num_steps: must be >= 1"):
        AttackConfig(epsilon=2, num_steps=0)
    # one step rule: the paper's n = eps + 1 (1 for eps <= 1) unless num_steps is given, then kept for every eps
    assert [AttackConfig(epsilon=e).steps for e in (0.5, 1, 2, 4)] == [1, 1, 3, 5]
    assert AttackConfig(epsilon=4, num_steps=2).steps_for(1.0) == 2


def test_advprop_learns_the_synthetic_set():
    """A few hundred AdvProp steps: a smoke of learning, far above 10% chance, measured with each validation
    batch's own BN statistics. After 300 steps of this tiny network the moving statistics still lag the
    weights, by an amount that depends on the machine's kernels (measured here: 0.13 with them against 0.55
    with batch statistics; 0.32 against 0.53 for vanilla), so they cannot tell learning apart; their updates
    are checked exactly in test_multi_bn.py and above."""
    model, step = train_tiny("advprop", steps=300)
    assert int(step.global_step.numpy()) == 300
    assert accuracy(model, bn_mode="batch") > 0.35


def make_bns_differ(model, domain="adv", seed=0):
    """Give `domain`'s BNs other statistics, gamma and beta than the main BN."""
    rng = np.random.default_rng(seed)
    for layer in model.bn_layers():
        for key, variable in layer.domain_variables(domain).items():
            low, high = {"gamma": (0.5, 1.5), "beta": (-0.3, 0.3), "moving_mean": (-0.5, 0.5),
                         "moving_variance": (0.5, 2.0)}[key]
            variable.assign(rng.uniform(low, high, variable.shape).astype("float32"))


class RecordingModel:
    """Forwards everything to a model and records each call's input and keywords."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, pixels, **kwargs):
        self.calls.append((pixels, kwargs))
        return self.model(pixels, **kwargs)


def test_the_training_attack_goes_through_the_auxiliary_bn_not_the_main_one():
    from advprop_tf.attacks.pgd import pgd

    model, reference = twin_models()
    make_bns_differ(model), make_bns_differ(reference)
    x, y = batch()
    ctx = context(epsilon=4, num_steps=2, step_size=2)
    recorder = RecordingModel(model)
    get_method("advprop")(recorder, x, y, ctx)
    training_inputs, kwargs = [(p, k) for p, k in recorder.calls if k.get("training")][-1]
    assert kwargs["domain"] == ("clean", "adv")
    trained_adv = tf.split(training_inputs, 2)[1].numpy()

    def through(domain):
        return pgd(lambda p: reference(p, training=False, domain=domain, bn_mode="inference"), x, y,
                   epsilon=4, num_steps=2, step_size=2, num_classes=10, seed=ctx.seed).numpy()

    np.testing.assert_allclose(trained_adv, through("adv"), atol=1e-4)
    assert np.abs(trained_adv - through("clean")).max() >= 1.0  # the main BN would give other images
    # the forward pass moved each domain's statistics with its own half only
    reference(x, training=True, domain="clean")
    reference(through("adv"), training=True, domain="adv")
    for domain in ("clean", "adv"):
        got, want = moving_stats(model, domain), moving_stats(reference, domain)
        for path in want:
            np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-5, err_msg=path)


def test_fine_grained_advprop_as_several_bns_each_with_its_own_epsilon(monkeypatch):
    import advprop_tf.methods as methods

    model = tiny_model(domains=("clean", "adv1", "adv2", "adv4"), **NO_DROPOUT)
    x, y = batch()
    calls = []
    real_pgd = methods.pgd
    monkeypatch.setattr(methods, "pgd", lambda *a, **k: calls.append(k) or real_pgd(*a, **k))
    recorder = RecordingModel(model)
    total, metrics = get_method("advprop")(recorder, x, y, context(epsilon=1, num_steps=None, step_size=1))
    assert [(k["epsilon"], k["num_steps"]) for k in calls] == [(1.0, 1), (2.0, 3), (4.0, 5)]
    attack_domains = {k["domain"] for _, k in recorder.calls if not k.get("training")}
    assert attack_domains == {"adv1", "adv2", "adv4"}
    inputs, kwargs = [(p, k) for p, k in recorder.calls if k.get("training")][-1]
    assert kwargs["domain"] == ("clean", "adv1", "adv2", "adv4")
    clean, *advs = tf.split(inputs, 4)
    for epsilon, adv in zip((1, 2, 4), advs):
        distance = np.abs(adv.numpy() - clean.numpy()).max()
        assert epsilon - 1 < distance <= epsilon + 1e-4
    assert {"adv1_loss", "adv2_loss", "adv4_loss"} <= set(metrics)


def test_a_float16_network_attacks_with_a_scaled_loss(monkeypatch):
    import keras

    import advprop_tf.methods as methods

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tiny_model(**NO_DROPOUT)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    calls = []
    real_pgd = methods.pgd
    monkeypatch.setattr(methods, "pgd", lambda *a, **k: calls.append(k) or real_pgd(*a, **k))
    x, y = batch()
    attack(model, x, y, "adv", context())
    attack(tiny_model(**NO_DROPOUT), x, y, "adv", context())
    assert [k["loss_scale"] for k in calls] == [methods.FLOAT16_ATTACK_LOSS_SCALE, 1.0]
