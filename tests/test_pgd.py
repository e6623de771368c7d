"""PGD: epsilon-ball, pixel range, direction of the loss, determinism, FGSM, no side effects."""

import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.attacks.pgd import _pgd_graph, fgsm, pgd, random_wrong_labels, steps_for_epsilon
from tests.helpers import synthetic_batches, train_tiny


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained briefly with AdvProp on the synthetic set, and a batch."""
    model, _ = train_tiny("advprop", steps=150)
    x, y = next(iter(synthetic_batches(32, split="validation", num_examples=32)))
    return model, x, y


def logits_fn_for(model, domain="clean", bn_mode="inference"):
    return lambda p: model(p, training=False, domain=domain, bn_mode=bn_mode)


def ce(model, x, labels):
    logits = model(x, training=False)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)).numpy()


def test_steps_for_epsilon_is_the_papers_pairing_and_one_rule_for_numbers_and_tensors():
    epsilons = (0, 0.25, 0.5, 1, 1.5, 2, 2.5, 3, 4, 16)
    want = [0, 1, 1, 1, 3, 3, 4, 4, 5, 17]
    assert [steps_for_epsilon(e) for e in epsilons] == want
    assert [int(steps_for_epsilon(tf.constant(float(e)))) for e in epsilons] == want
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        steps_for_epsilon(-1)


def test_a_fraction_of_random_start_batches_starts_from_the_clean_images():
    x = tf.fill([2, 4, 4, 3], 100.0)
    y = tf.constant([0, 1])

    def flat_logits(p):  # zero gradient: PGD does not move, so the result is its start
        return tf.zeros([2, 3]) + 0.0 * tf.reduce_sum(p)

    starts = [pgd(flat_logits, x, y, 8, 1, 1.0, targeted=False, random_start=True, seed=(5, i),
                  prob_start_from_clean=0.2).numpy() for i in range(200)]
    clean = sum(np.array_equal(s, x.numpy()) for s in starts)
    assert 20 <= clean <= 60  # ~0.2 of the batches (binomial 200 x 0.2: 40 +- 6)
    assert all(np.abs(s - 100).max() <= 8 for s in starts)
    never = [pgd(flat_logits, x, y, 8, 1, 1.0, targeted=False, random_start=True, seed=(5, i)).numpy()
             for i in range(20)]
    assert not any(np.array_equal(s, x.numpy()) for s in never)


def test_float16_attack_loss_is_scaled_so_tiny_gradients_keep_their_sign():
    weights = tf.constant(np.random.default_rng(0).normal(size=(48, 3)).astype(np.float32))

    def logits_fn(pixels):  # a float16 network whose input gradients are ~1e-8: below float16's range
        features = tf.reshape(tf.cast(pixels, tf.float16), [2, 48]) * tf.constant(1e-3, tf.float16)
        return tf.cast(tf.matmul(features, tf.cast(weights, tf.float16)) * tf.constant(1e-5, tf.float16), tf.float32)

    x = tf.fill([2, 4, 4, 3], 100.0)
    y = tf.constant([0, 1])
    unscaled = pgd(logits_fn, x, y, 2, 1, 2.0, targeted=False, seed=(1, 1)).numpy()
    scaled = pgd(logits_fn, x, y, 2, 1, 2.0, targeted=False, seed=(1, 1), loss_scale=1024.0).numpy()
    np.testing.assert_array_equal(unscaled, x.numpy())  # the signs underflowed to 0: no attack at all
    assert np.abs(scaled - x.numpy()).min() == 2.0  # every pixel moved by the step


@pytest.mark.parametrize("eps,steps,random_start", [(4, 5, True), (2, 3, False), (8, 10, True)])
def test_stays_in_the_epsilon_ball_and_pixel_range(trained, eps, steps, random_start):
    model, x, y = trained
    # include saturated pixels to exercise the [0, 255] clip
    x = tf.concat([tf.zeros_like(x[:4]), tf.fill(tf.shape(x[:4]), 255.0), x[8:]], 0)
    adv = pgd(logits_fn_for(model), x, y, eps, steps, 1.0, targeted=False, random_start=random_start, seed=3)
    diff = np.abs(adv.numpy() - x.numpy())
    assert diff.max() <= eps + 1e-4
    assert diff.max() >= eps - 1e-4  # it really moved to the boundary somewhere
    assert adv.numpy().min() >= 0 and adv.numpy().max() <= 255
    assert adv.shape == x.shape and adv.dtype == x.dtype


def test_untargeted_raises_and_targeted_lowers_the_loss(trained):
    model, x, y = trained
    clean_loss = ce(model, x, y)
    adv = pgd(logits_fn_for(model), x, y, 4, 5, 1.0, targeted=False)
    assert ce(model, adv, y) > clean_loss + 0.1
    targets = random_wrong_labels(y, 10, seed=[1, 2])
    target_loss_clean = ce(model, x, targets)
    adv_t = pgd(logits_fn_for(model), x, y, 4, 5, 1.0, targeted=True, num_classes=10, seed=[1, 2])
    assert ce(model, adv_t, targets) < target_loss_clean - 0.1


def test_deterministic_with_a_seed(trained):
    model, x, y = trained
    a = pgd(logits_fn_for(model), x, y, 3, 4, 1.0, targeted=True, random_start=True, num_classes=10, seed=7)
    b = pgd(logits_fn_for(model), x, y, 3, 4, 1.0, targeted=True, random_start=True, num_classes=10, seed=7)
    c = pgd(logits_fn_for(model), x, y, 3, 4, 1.0, targeted=True, random_start=True, num_classes=10, seed=8)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


@pytest.mark.parametrize("targeted", [False, True])
def test_one_step_without_random_start_is_fgsm(trained, targeted):
    model, x, y = trained
    eps = 3.0
    target = random_wrong_labels(y, 10, seed=[5, 5]) if targeted else y
    xv = tf.Variable(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(target, model(xv, training=False)))
    grad = tape.gradient(loss, xv).numpy()
    direction = -1.0 if targeted else 1.0
    expected = np.clip(x.numpy() + direction * eps * np.sign(grad), 0, 255)
    got = pgd(logits_fn_for(model), x, y, eps, 1, eps, targeted=targeted, num_classes=10, seed=[5, 5])
    # Where the gradient is ~0 its sign is float noise (graph vs eager): compare elsewhere.
    per_example_max = np.abs(grad).max(axis=(1, 2, 3), keepdims=True)
    clear = np.abs(grad) > 1e-3 * per_example_max
    assert clear.mean() > 0.5  # most pixels (62-68% with this fixture)
    np.testing.assert_allclose(got.numpy()[clear], expected[clear], atol=1e-4)
    if not targeted:
        np.testing.assert_allclose(fgsm(logits_fn_for(model), x, y, eps).numpy()[clear], expected[clear], atol=1e-4)


@pytest.mark.parametrize("bn_mode", ["inference", "batch"])
def test_attack_changes_nothing_of_the_model(trained, bn_mode):
    model, x, y = trained
    before = [v.numpy().copy() for v in model.weights]
    pgd(logits_fn_for(model, "adv", bn_mode), x, y, 4, 5, 1.0, targeted=True, random_start=True, num_classes=10)
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)


def _live_op_types(function):
    """Op types of the nodes a function's outputs depend on.

    TensorFlow prunes every other node of a function body before running it,
    so these are the ops that actually execute.
    """
    nodes = {n.name: n for n in function.node_def}
    stack = [v.split(":")[0] for v in function.ret.values()] + list(function.control_ret.values())
    seen = set()
    while stack:
        name = stack.pop().lstrip("^").split(":")[0]
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        stack.extend(nodes[name].input)
    return {nodes[n].op for n in seen}


def test_no_weight_gradient_is_computed(trained):
    """The tape watches only the input: the attack loop runs input gradients, never filter gradients."""
    model, x, y = trained
    fn = tf.function(lambda p, l: pgd(logits_fn_for(model), p, l, 2, 3, 1.0, targeted=False))
    graph_def = fn.get_concrete_function(x, y).graph.as_graph_def()
    bodies = [f for f in graph_def.library.function if "Conv2DBackpropInput" in {n.op for n in f.node_def}]
    assert bodies, "no attack step body found"
    for body in bodies:
        live = _live_op_types(body)
        assert "Conv2DBackpropInput" in live and "DepthwiseConv2dNativeBackpropInput" in live
        assert not [t for t in live if "BackpropFilter" in t], sorted(live)
        assert not [t for t in live if t.startswith("ResourceApply") or t == "AssignVariableOp"]


def test_one_and_ten_steps_trace_one_graph(trained):
    model, x, y = trained
    fn = logits_fn_for(model)
    pgd(fn, x, y, 2.0, 1, 1.0, targeted=False)
    count = _pgd_graph.experimental_get_tracing_count()
    pgd(fn, x, y, 2.0, 10, 1.0, targeted=False)
    pgd(fn, x, y, 3.0, 4, 0.5, targeted=False)
    assert _pgd_graph.experimental_get_tracing_count() == count


def test_targets_are_never_the_true_class():
    labels = tf.constant(np.arange(10000) % 7)
    for seed in (None, [3, 4]):
        targets = random_wrong_labels(labels, 7, seed).numpy()
        assert not np.any(targets == labels.numpy())
        assert set(np.unique(targets)) == set(range(7))  # every wrong class is reachable
    # uniform over the 6 wrong classes of label 0
    counts = np.bincount(random_wrong_labels(tf.zeros(60000, tf.int32), 7, [1, 1]).numpy(), minlength=7)
    assert counts[0] == 0 and np.all(np.abs(counts[1:] / 10000 - 1) < 0.06)


def test_epsilon_zero_returns_clean_pixels(trained):
    model, x, y = trained
    np.testing.assert_array_equal(pgd(logits_fn_for(model), x, y, 0, 0, 1.0).numpy(), x.numpy())
    np.testing.assert_array_equal(pgd(logits_fn_for(model), x, y, 0, 3, 1.0, random_start=True).numpy(), x.numpy())


def test_bad_arguments_name_the_value():
    fn = lambda p: p[:, 0, 0, :]
    x = tf.zeros([2, 4, 4, 3])
    y = tf.zeros([2], tf.int32)
    with pytest.raises(ValueError, match="epsilon must be >= 0, got -1"):
        pgd(fn, x, y, -1, 1, 1.0)
    with pytest.raises(ValueError, match="num_steps is 0 with epsilon=2"):
        pgd(fn, x, y, 2, 0, 1.0)
    with pytest.raises(ValueError, match="step_size must be > 0, got 0"):
        pgd(fn, x, y, 2, 1, 0)
    with pytest.raises(ValueError, match="step_size must be > 0, got -0.5"):
        pgd(fn, x, y, 2, 1, -0.5)
