"""MultiBatchNormalization: per-domain variables, routing, splitting, modes, precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.models.multi_bn import MultiBatchNormalization
from tests.helpers import two_cpu_strategy


def make_layer(domains=("clean", "adv"), channels=4, momentum=0.9):
    layer = MultiBatchNormalization(domains, momentum=momentum)
    layer.build((None, 3, 3, channels))
    rng = np.random.default_rng(0)
    for d in domains:
        v = layer.domain_variables(d)
        v["gamma"].assign(rng.uniform(0.5, 2.0, channels))
        v["beta"].assign(rng.normal(0, 1, channels))
        v["moving_mean"].assign(rng.normal(0, 1, channels))
        v["moving_variance"].assign(rng.uniform(0.5, 2.0, channels))
    return layer


def snapshot(layer):
    return {d: {k: np.array(v) for k, v in layer.domain_variables(d).items()} for d in layer.domains}


def reference_bn(x, gamma, beta, mean, var, eps=1e-3):
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def test_one_full_bn_per_domain():
    layer = make_layer(("clean", "adv", "aug"), channels=5)
    assert len(layer.weights) == 3 * 4
    assert len(layer.trainable_weights) == 3 * 2
    assert layer.main_domain == "clean"
    assert layer.momentum == pytest.approx(0.9)


def test_defaults_match_authors():
    layer = MultiBatchNormalization()
    assert layer.domains == ("clean", "adv")
    assert layer.momentum == pytest.approx(0.99)
    assert layer.epsilon == pytest.approx(1e-3)


def test_inference_uses_the_routed_domain_moving_statistics():
    layer = make_layer()
    x = np.random.default_rng(1).normal(size=(6, 3, 3, 4)).astype("float32")
    for d in layer.domains:
        v = snapshot(layer)[d]
        expected = reference_bn(x, v["gamma"], v["beta"], v["moving_mean"], v["moving_variance"])
        np.testing.assert_allclose(layer(x, training=False, domain=d), expected, rtol=1e-5, atol=1e-5)
    # default domain is the main one
    np.testing.assert_allclose(layer(x, training=False), layer(x, training=False, domain="clean"))


def test_training_updates_only_the_routed_domain():
    layer = make_layer(momentum=0.9)
    before = snapshot(layer)
    x = np.random.default_rng(2).normal(3.0, 2.0, size=(8, 3, 3, 4)).astype("float32")
    y = layer(x, training=True, domain="adv").numpy()
    after = snapshot(layer)
    for k in before["clean"]:
        np.testing.assert_array_equal(before["clean"][k], after["clean"][k])
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(after["adv"]["moving_mean"], 0.9 * before["adv"]["moving_mean"] + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(after["adv"]["moving_variance"], 0.9 * before["adv"]["moving_variance"] + 0.1 * var, rtol=1e-5)
    v = before["adv"]
    np.testing.assert_allclose(y, reference_bn(x, v["gamma"], v["beta"], mean, var), rtol=1e-4, atol=1e-4)


def test_batch_mode_uses_batch_statistics_without_updating():
    layer = make_layer()
    before = snapshot(layer)
    x = np.random.default_rng(3).normal(1.0, 3.0, size=(8, 3, 3, 4)).astype("float32")
    y = layer(x, training=False, domain="adv", bn_mode="batch").numpy()
    after = snapshot(layer)
    for d in layer.domains:
        for k in before[d]:
            np.testing.assert_array_equal(before[d][k], after[d][k])
    v = before["adv"]
    expected = reference_bn(x, v["gamma"], v["beta"], x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2)))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_split_equals_routing_each_chunk(training):
    domains = ("clean", "adv", "aug")
    split_layer = make_layer(domains)
    routed_layer = make_layer(domains)
    rng = np.random.default_rng(4)
    chunks = [rng.normal(i, 1 + i, size=(4, 3, 3, 4)).astype("float32") for i in range(3)]
    y_split = split_layer(np.concatenate(chunks), training=training, domain=domains).numpy()
    y_routed = np.concatenate(
        [routed_layer(c, training=training, domain=d).numpy() for c, d in zip(chunks, domains)]
    )
    np.testing.assert_allclose(y_split, y_routed, rtol=1e-5, atol=1e-5)
    s, r = snapshot(split_layer), snapshot(routed_layer)
    for d in domains:
        for k in s[d]:
            np.testing.assert_allclose(s[d][k], r[d][k], rtol=1e-6, atol=1e-6)


def test_unknown_domain_is_a_value_error_naming_the_domains():
    layer = make_layer()
    x = np.zeros((4, 3, 3, 4), "float32")
    with pytest.raises(ValueError, match=r"'robust'.*\('clean', 'adv'\)"):
        layer(x, domain="robust")
    with pytest.raises(ValueError, match=r"'robust'.*\('clean', 'adv'\)"):
        layer(x, domain=("clean", "robust"))


def test_uneven_split_is_a_value_error_naming_the_domains():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"batch of 5 .*\('clean', 'adv'\)"):
        layer(np.zeros((5, 3, 3, 4), "float32"), training=True, domain=("clean", "adv"))


def test_uneven_split_with_unknown_batch_fails_at_run_time():
    layer = make_layer()
    fn = tf.function(
        lambda x: layer(x, training=True, domain=("clean", "adv")),
        input_signature=[tf.TensorSpec([None, 3, 3, 4], tf.float32)],
    )
    assert fn(np.zeros((4, 3, 3, 4), "float32")).shape == (4, 3, 3, 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="cannot be split evenly"):
        fn(np.zeros((5, 3, 3, 4), "float32"))


def test_invalid_domain_lists_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        MultiBatchNormalization(("clean", "clean"))
    with pytest.raises(ValueError, match="at least one"):
        MultiBatchNormalization(())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_tf_function_and_xla_match_eager(jit_compile):
    eager_layer, graph_layer = make_layer(), make_layer()
    x = np.random.default_rng(5).normal(size=(8, 3, 3, 4)).astype("float32")
    fn = tf.function(
        lambda x: graph_layer(x, training=True, domain=("clean", "adv")), jit_compile=jit_compile
    )
    np.testing.assert_allclose(
        fn(x), eager_layer(x, training=True, domain=("clean", "adv")), rtol=1e-4, atol=1e-4
    )
    e, g = snapshot(eager_layer), snapshot(graph_layer)
    for d in e:
        np.testing.assert_allclose(e[d]["moving_variance"], g[d]["moving_variance"], rtol=1e-5)


@pytest.mark.parametrize("policy,dtype", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_keeps_statistics_in_float32(policy, dtype):
    keras.mixed_precision.set_global_policy(policy)
    layer = MultiBatchNormalization()
    x = tf.cast(np.random.default_rng(6).normal(100.0, 50.0, size=(8, 3, 3, 4)), dtype)
    y = layer(x, training=True, domain=("clean", "adv"))
    assert y.dtype == dtype
    for d in layer.domains:
        for v in layer.domain_variables(d).values():
            assert v.dtype == "float32"
    # statistics of values around 100 with spread 50: float32 moments, finite.
    mean = np.array(layer.domain_variables("clean")["moving_mean"])
    assert np.all(np.isfinite(mean)) and np.all(mean > 0.5)
    assert np.all(np.isfinite(np.array(y.numpy(), dtype="float32")))


def test_config_round_trip():
    layer = MultiBatchNormalization(("a", "b", "c"), momentum=0.9, epsilon=1e-5, synchronized=True)
    clone = MultiBatchNormalization.from_config(layer.get_config())
    assert clone.domains == ("a", "b", "c")
    assert clone.momentum == 0.9 and clone.epsilon == 1e-5 and clone.synchronized


def test_synchronized_statistics_span_replicas():
    """Under MirroredStrategy, synchronized BN sees the global batch of each domain."""
    strategy = two_cpu_strategy()
    with strategy.scope():
        sync_layer = MultiBatchNormalization(momentum=0.0, synchronized=True)
        sync_layer.build((None, 3, 3, 4))
    rng = np.random.default_rng(7)
    # Replica r gets [clean_r; adv_r]; the statistics must be those of all clean / all adv images.
    clean = [rng.normal(r * 4.0, 1.0, size=(2, 3, 3, 4)).astype("float32") for r in range(2)]
    adv = [rng.normal(10 + r * 4.0, 2.0, size=(2, 3, 3, 4)).astype("float32") for r in range(2)]
    per_replica = [np.concatenate([c, a]) for c, a in zip(clean, adv)]

    def value_fn(ctx):
        return tf.constant(per_replica[ctx.replica_id_in_sync_group])

    data = strategy.experimental_distribute_values_from_function(value_fn)

    @tf.function
    def step(x):
        sync_layer(x, training=True, domain=("clean", "adv"))

    strategy.run(step, args=(data,))
    all_clean, all_adv = np.concatenate(clean), np.concatenate(adv)
    np.testing.assert_allclose(
        sync_layer.domain_variables("clean")["moving_mean"], all_clean.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        sync_layer.domain_variables("adv")["moving_variance"], all_adv.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4
    )


def test_fused_batch_statistics_have_the_gradients_of_the_plain_formula():
    """Batch-statistics BN runs as TensorFlow's fused op; its backward equals moments + batch_normalization."""
    layer = make_layer()
    x = tf.constant(np.random.default_rng(5).normal(2.0, 3.0, size=(6, 3, 3, 4)).astype("float32"))
    upstream = tf.constant(np.random.default_rng(6).normal(size=(6, 3, 3, 4)).astype("float32"))
    v = layer.domain_variables("adv")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        fused = tf.reduce_sum(upstream * layer(x, training=True, domain="adv", bn_mode="batch"))
        mean, var = tf.nn.moments(x, [0, 1, 2])
        plain = tf.reduce_sum(upstream * tf.nn.batch_normalization(x, mean, var, v["beta"], v["gamma"], 1e-3))
    for target in (x, v["gamma"], v["beta"]):
        np.testing.assert_allclose(tape.gradient(fused, target), tape.gradient(plain, target), rtol=1e-4, atol=1e-5)


def test_uneven_chunks_route_each_part_in_its_own_mode():
    from advprop_tf.models.multi_bn import Chunks

    layer, reference = make_layer(), make_layer()
    x = np.random.default_rng(7).normal(1.0, 2.0, size=(7, 3, 3, 4)).astype("float32")
    y = layer(x, training=True, domain=Chunks(("clean", "adv"), (5, 2), ("train", "batch"))).numpy()
    np.testing.assert_allclose(y[:5], reference(x[:5], training=True, domain="clean").numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[5:], reference(x[5:], training=True, domain="adv", bn_mode="batch").numpy(),
                               rtol=1e-5, atol=1e-5)
    got, want = snapshot(layer), snapshot(reference)
    for d in layer.domains:  # clean updated from its 5 images, adv not at all ("batch")
        for k in got[d]:
            np.testing.assert_allclose(got[d][k], want[d][k], rtol=1e-6, err_msg=f"{d}/{k}")
    assert not np.allclose(got["clean"]["moving_mean"], snapshot(make_layer())["clean"]["moving_mean"])
    np.testing.assert_array_equal(got["adv"]["moving_mean"], snapshot(make_layer())["adv"]["moving_mean"])
    with pytest.raises(ValueError, match="not the 6 images"):
        layer(x, training=True, domain=Chunks(("clean", "adv"), (4, 2)))
    with pytest.raises(ValueError, match="one size and BN mode per domain"):
        Chunks(("clean", "adv"), (7,))
