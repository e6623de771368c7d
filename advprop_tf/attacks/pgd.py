"""L-infinity PGD in pixel units (0-255), the attacker of AdvProp.

The attack knows nothing of the model's insides: it takes a closure
`logits_fn(pixels) -> logits`. The caller decides which BN domain and BN mode
that closure uses, and the closure must not update BN statistics.

Only the input is watched by the gradient tape, so no weight gradient is ever
computed; the step loop is a `tf.while_loop`, so 1 and 10 steps are one graph
and the number of steps (and epsilon) may be tensors, e.g. scheduled over
training.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import tensorflow as tf

from advprop_tf import randomness
from advprop_tf.errors import ConfigError

PIXEL_MIN = 0.0
PIXEL_MAX = 255.0
ATTACK_BN_MODES = ("batch", "inference")


def steps_for_epsilon(epsilon):
    """The ONE step-count rule: the paper's n = epsilon + 1 iterations, n = 1 for 0 < epsilon <= 1
    (so 0.5 attacks with one step), fractional epsilon above 1 rounded up (2.5 -> 4), 0 for no attack.

    A Python number gives an int; a scalar tensor (a scheduled epsilon) an int32 tensor.
    """
    if isinstance(epsilon, numbers.Number):
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        return 0 if epsilon == 0 else 1 if epsilon <= 1 else math.ceil(epsilon) + 1
    eps = tf.cast(epsilon, tf.float32)
    return tf.where(eps <= 0.0, 0, tf.where(eps <= 1.0, 1, tf.cast(tf.math.ceil(eps), tf.int32) + 1))


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """PGD in pixel units, for training and evaluation alike.

    num_steps: None for the paper's rule at every epsilon (`steps_for_epsilon`: a
      scheduled epsilon's and an adv<eps> domain's too); a number is kept for all.
    prob_start_from_clean: with random_start, the share of batches that start from
      the clean images (the authors' adversarial training: 0.2; evaluation: 0).
    attack_bn_mode: how a training attack runs the attacked domain's BN:
      "inference" (its running statistics, no update; the authors'
      adversarial-training code: "We use the testing mode of [BN] during
      attack", and ~40% cheaper per attack step here, BN's backward being
      affine) or "batch" (batch statistics, not written back: the function the
      training forward pass computes). An evaluation attacks the evaluated
      network as it is.
    Invalid values raise ConfigError naming the field.
    """

    epsilon: float = 1.0
    num_steps: int | None = None
    step_size: float = 1.0
    targeted: bool = True
    random_start: bool = False
    prob_start_from_clean: float = 0.0
    attack_bn_mode: str = "inference"

    def __post_init__(self):
        if not self.epsilon >= 0:
            raise ConfigError("epsilon", f"must be >= 0, got {self.epsilon:g}")
        if not self.step_size > 0:
            raise ConfigError("step_size", f"must be > 0, got {self.step_size:g}")
        if self.num_steps is not None and self.num_steps < (1 if self.epsilon > 0 else 0):
            raise ConfigError("num_steps", f"must be >= 1 when epsilon > 0, got {self.num_steps}")
        if not 0.0 <= self.prob_start_from_clean <= 1.0:
            raise ConfigError("prob_start_from_clean", f"must be in [0, 1], got {self.prob_start_from_clean:g}")
        if self.attack_bn_mode not in ATTACK_BN_MODES:
            raise ConfigError("attack_bn_mode", f"must be one of {', '.join(ATTACK_BN_MODES)}, got {self.attack_bn_mode!r}")

    def steps_for(self, epsilon):
        """Iterations at `epsilon` (a number or a scalar tensor): num_steps, or the paper's rule."""
        return steps_for_epsilon(epsilon) if self.num_steps is None else self.num_steps

    @property
    def steps(self) -> int:
        """Iterations at the configured epsilon."""
        return self.steps_for(self.epsilon)


def random_wrong_labels(labels, num_classes: int, seed=None):
    """A uniformly random class different from each true label."""
    labels = tf.cast(labels, tf.int32)
    shape = tf.shape(labels)
    if seed is None:
        offsets = tf.random.uniform(shape, 1, num_classes, dtype=tf.int32)
    else:
        offsets = randomness.integers(shape, randomness.fold_in(seed, 1), 1, num_classes)
    return (labels + offsets) % num_classes


def epsilon_ball(x_clean, epsilon):
    """(lower, upper): the L-inf ball of radius `epsilon` around `x_clean`, within [0, 255]."""
    return tf.maximum(x_clean - epsilon, PIXEL_MIN), tf.minimum(x_clean + epsilon, PIXEL_MAX)


def random_start(x_clean, epsilon, seed=None, prob_start_from_clean=0.0):
    """A uniform point of the epsilon-ball around float32 `x_clean`; with probability
    `prob_start_from_clean` the whole batch starts from `x_clean` itself (one draw per call)."""
    shape = tf.shape(x_clean)
    if seed is None:
        noise = tf.random.uniform(shape, -1.0, 1.0)
        from_clean = tf.random.uniform([]) < prob_start_from_clean
    else:  # the same numbers with and without XLA (randomness.py)
        noise = randomness.uniform(shape, randomness.fold_in(seed, 2), -1.0, 1.0)
        from_clean = randomness.uniform([], randomness.fold_in(seed, 3)) < prob_start_from_clean
    noise = tf.where(from_clean, tf.zeros_like(noise), noise)
    lower, upper = epsilon_ball(x_clean, epsilon)
    return tf.clip_by_value(x_clean + epsilon * noise, lower, upper)


def sign_step(x, grad, step_size, lower, upper):
    """One ascent step x + step_size * sign(grad), projected on [lower, upper].

    Non-finite gradient components (an overflowing scaled float16 loss) count as 0.
    """
    grad = tf.where(tf.math.is_finite(grad), grad, tf.zeros_like(grad))
    return tf.clip_by_value(x + step_size * tf.sign(tf.cast(grad, x.dtype)), lower, upper)


def _validate(epsilon, num_steps, step_size):
    """Check Python numbers eagerly; tensors are the caller's responsibility."""
    if isinstance(epsilon, numbers.Number) and epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if isinstance(step_size, numbers.Number) and step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if isinstance(num_steps, numbers.Number):
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        if num_steps == 0 and isinstance(epsilon, numbers.Number) and epsilon > 0:
            raise ValueError(f"num_steps is 0 with epsilon={epsilon}: no attack would run")


def pgd(
    logits_fn,
    pixels,
    labels,
    epsilon,
    num_steps,
    step_size,
    targeted: bool = True,
    random_start: bool = False,
    num_classes: int | None = None,
    seed=None,
    prob_start_from_clean: float = 0.0,
    loss_scale: float = 1.0,
):
    """Projected gradient descent under L-infinity, in pixel units.

    Args:
      logits_fn: pixels -> logits; must not change the model.
      pixels: float [N, H, W, C] in [0, 255].
      labels: int [N], the true classes.
      epsilon: L-inf radius in pixels (0-255 scale); 0 returns `pixels`.
      num_steps: iterations (graph loop; may be a tensor).
      step_size: pixels moved per step, times sign(gradient).
      targeted: descend the loss of a random wrong class per example (the
        authors' choice); otherwise ascend the loss of the true class.
      random_start: start from a uniform point in the epsilon-ball.
      prob_start_from_clean: with random_start, the probability that a whole
        batch starts from the clean images instead (the authors' adversarial
        training uses 0.2; their evaluation 0).
      loss_scale: multiplies the attack loss before its gradient (1024 for a
        float16 network), so small input gradients do not underflow to 0 and
        lose their sign; sign(scale * g) = sign(g), and non-finite components
        of an overflowing gradient count as 0.
      num_classes: needed for targeted attacks; inferred from the logits if None.
      seed: int or int pair for deterministic targets and start; None uses
        TensorFlow's global random state.

    Returns:
      Adversarial pixels, same shape and dtype as `pixels`, no gradient.
    """
    _validate(epsilon, num_steps, step_size)
    if isinstance(epsilon, numbers.Number) and epsilon == 0:
        return tf.stop_gradient(tf.convert_to_tensor(pixels))
    return _pgd_graph(
        logits_fn,
        tf.convert_to_tensor(pixels),
        tf.convert_to_tensor(labels),
        tf.convert_to_tensor(epsilon, tf.float32),
        tf.convert_to_tensor(num_steps, tf.int32),
        tf.convert_to_tensor(step_size, tf.float32),
        bool(targeted),
        bool(random_start),
        num_classes,
        None if seed is None else tf.convert_to_tensor(seed, tf.int32),
        tf.convert_to_tensor(prob_start_from_clean, tf.float32),
        tf.convert_to_tensor(loss_scale, tf.float32),
    )


def _attack_loss(logits, labels, targeted_labels, targeted):
    """Summed cross-entropy; its gradient sign is what PGD follows."""
    logits = tf.cast(logits, tf.float32)
    if targeted:
        # minimise the loss of the target == maximise its negative
        return -tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(targeted_labels, logits)
        )
    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


@tf.function(autograph=False)
def _pgd_graph(
    logits_fn, pixels, labels, epsilon, num_steps, step_size, targeted, start_randomly,
    num_classes, seed, prob_start_from_clean, loss_scale,
):
    dtype = pixels.dtype
    x_clean = tf.cast(pixels, tf.float32)
    labels = tf.cast(labels, tf.int32)
    lower, upper = epsilon_ball(x_clean, epsilon)
    x_start = random_start(x_clean, epsilon, seed, prob_start_from_clean) if start_randomly else x_clean

    if targeted:
        if num_classes is None:
            num_classes = int(logits_fn(tf.cast(x_clean[:1], dtype)).shape[-1])
        target_labels = random_wrong_labels(labels, num_classes, seed)
    else:
        target_labels = labels

    def step(i, x):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            loss = loss_scale * _attack_loss(logits_fn(tf.cast(x, dtype)), labels, target_labels, targeted)
        return i + 1, sign_step(x, tape.gradient(loss, x), step_size, lower, upper)

    _, x_adv = tf.while_loop(
        lambda i, _: i < num_steps,
        step,
        (tf.constant(0, tf.int32), x_start),
        parallel_iterations=1,
    )
    return tf.stop_gradient(tf.cast(x_adv, dtype))


def fgsm(logits_fn, pixels, labels, epsilon, targeted=False, num_classes=None, seed=None):
    """Fast gradient sign method: one PGD step of size epsilon."""
    return pgd(logits_fn, pixels, labels, epsilon, 1, epsilon, targeted=targeted,
               random_start=False, num_classes=num_classes, seed=seed)
