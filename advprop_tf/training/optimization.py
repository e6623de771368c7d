"""The authors' optimizer, learning-rate schedule, weight decay and loss."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from advprop_tf.config import LR_SCHEDULES

BASE_LEARNING_RATE = 0.016  # per 256 images


def with_warmup(step, decayed, learning_rate, warmup_steps, warmup_from=0.0):
    """`decayed` after `warmup_steps`; before, a line from `warmup_from` to `learning_rate` (step a float tensor)."""
    if warmup_steps <= 0:
        return decayed
    warmup = warmup_from + (learning_rate - warmup_from) * step / warmup_steps
    return tf.where(step < warmup_steps, warmup, decayed)


@keras.saving.register_keras_serializable(package="advprop_tf")
class WarmupExponentialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr * decay_rate ** floor(step / decay_steps), linearly warmed up from 0.

    As the authors: the staircase decay counts from step 0 and the warm-up
    simply replaces it for the first `warmup_steps` steps.
    """

    def __init__(self, learning_rate, decay_steps, decay_rate=0.97, warmup_steps=0):
        self.learning_rate = float(learning_rate)
        self.decay_steps = max(1.0, float(decay_steps))
        self.decay_rate = float(decay_rate)
        self.warmup_steps = float(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        decayed = self.learning_rate * tf.pow(self.decay_rate, tf.floor(step / self.decay_steps))
        return with_warmup(step, decayed, self.learning_rate, self.warmup_steps)

    def get_config(self):
        return dict(learning_rate=self.learning_rate, decay_steps=self.decay_steps,
                    decay_rate=self.decay_rate, warmup_steps=self.warmup_steps)


@keras.saving.register_keras_serializable(package="advprop_tf")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up then cosine decay to 0 at `total_steps` (for small experiments)."""

    def __init__(self, learning_rate, total_steps, warmup_steps=0):
        self.learning_rate = float(learning_rate)
        self.total_steps = max(1.0, float(total_steps))
        self.warmup_steps = float(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        span = tf.maximum(self.total_steps - self.warmup_steps, 1.0)
        progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
        cosine = 0.5 * self.learning_rate * (1.0 + tf.cos(math.pi * progress))
        return with_warmup(step, cosine, self.learning_rate, self.warmup_steps)

    def get_config(self):
        return dict(learning_rate=self.learning_rate, total_steps=self.total_steps,
                    warmup_steps=self.warmup_steps)


@keras.saving.register_keras_serializable(package="advprop_tf")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr x decay_rate from each boundary step on, after a linear warm-up from `warmup_from`.

    The ResNet recipe of the authors' adversarial-training code ("ImageNet in
    1 Hour"): lr 0.1 x batch/256, /10 at epochs 35, 70, 95 of 110, the first 5
    epochs rising linearly from 0.1 (the lr of 256 images) to the scaled lr.
    """

    def __init__(self, learning_rate, boundaries, decay_rate=0.1, warmup_steps=0, warmup_from=0.0):
        self.learning_rate = float(learning_rate)
        self.boundaries = [int(b) for b in boundaries]
        self.decay_rate = float(decay_rate)
        self.warmup_steps = float(warmup_steps)
        self.warmup_from = float(warmup_from)
        values = [self.learning_rate * self.decay_rate**i for i in range(len(self.boundaries) + 1)]
        # Keras switches after a boundary (step > b); ours from it (step >= b).
        self._piecewise = keras.optimizers.schedules.PiecewiseConstantDecay([b - 1 for b in self.boundaries], values)

    def __call__(self, step):
        decayed = tf.cast(self._piecewise(step), tf.float32)
        return with_warmup(tf.cast(step, tf.float32), decayed, self.learning_rate, self.warmup_steps, self.warmup_from)

    def get_config(self):
        return dict(learning_rate=self.learning_rate, boundaries=self.boundaries, decay_rate=self.decay_rate,
                    warmup_steps=self.warmup_steps, warmup_from=self.warmup_from)


def scaled_learning_rate(global_batch_size: int, base: float = BASE_LEARNING_RATE) -> float:
    """0.016 x global_batch / 256, the authors' linear scaling."""
    return base * global_batch_size / 256.0





def make_schedule(name, learning_rate, steps_per_epoch, total_steps, warmup_epochs=5.0,
                  decay_epochs=2.4, decay_rate=0.97, boundary_epochs=(), warmup_from=0.0):
    """`decay_epochs` is the exponential period; `boundary_epochs` the step schedule's boundaries,
    whose warm-up starts at `warmup_from` (the others warm up from 0)."""
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if name == "exponential":
        return WarmupExponentialDecay(learning_rate, decay_epochs * steps_per_epoch, decay_rate, warmup_steps)
    if name == "cosine":
        return WarmupCosineDecay(learning_rate, total_steps, warmup_steps)
    if name == "constant":
        return WarmupExponentialDecay(learning_rate, 1, 1.0, warmup_steps)
    if name == "step":
        boundaries = [int(round(float(e) * steps_per_epoch)) for e in boundary_epochs]
        return WarmupStepDecay(learning_rate, boundaries, decay_rate, warmup_steps, min(warmup_from, learning_rate))
    raise ValueError(f"unknown learning-rate schedule {name!r}; valid: {', '.join(LR_SCHEDULES)}")


class NonFiniteSkippingOptimizer(keras.optimizers.LossScaleOptimizer):
    """Skips a step whose gradients are not finite, at a loss scale fixed to 1 (float32 runs, --on_nan=skip).

    Keras' LossScaleOptimizer is what skips such a step under every strategy
    (its finiteness test and conditional update sit in cross-replica context),
    but it also halves its scale at each skip, meant for float16: after ~150
    skips a float32 run's scale would reach 0 and every later step be skipped.
    Here the skip changes nothing but the step's own update.
    """

    def __init__(self, inner_optimizer, name=None):
        super().__init__(inner_optimizer, initial_scale=1.0, dynamic_growth_steps=2**31 - 1, name=name)

    def _stateful_handle_non_finite_grads(self):
        """Keras halves the scale here; a fixed scale of 1 stays."""

    def _stateless_handle_non_finite_grads(self, optimizer_variables, trainable_variables):
        return trainable_variables, optimizer_variables


def make_optimizer(name, schedule, model=None, skip_non_finite=False, loss_scaling=False):
    """RMSProp(rho 0.9, momentum 0.9, eps 1e-3) as the authors, or SGD with Nesterov momentum.

    The RMSProp accumulators start at 1, as in TF1's RMSPropOptimizer that the
    authors used (Keras starts them at 0, which makes the first steps huge).
    `loss_scaling` (float16) wraps it in a dynamic LossScaleOptimizer, which
    skips any step whose gradients are not finite and halves its scale;
    `skip_non_finite` alone (float32) in a NonFiniteSkippingOptimizer, which
    skips such steps at a scale fixed to 1.
    """
    if name == "rmsprop":
        optimizer = keras.optimizers.RMSprop(schedule, rho=0.9, momentum=0.9, epsilon=1e-3)
    elif name == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    else:
        raise ValueError(f"unknown optimizer {name!r}; valid: rmsprop, sgd")
    if model is not None:
        optimizer.build(model.trainable_variables)
        if name == "rmsprop":
            for velocity in optimizer._velocities:
                velocity.assign(tf.ones_like(velocity))
    if loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0**15, dynamic_growth_steps=2000)
    elif skip_non_finite:
        optimizer = NonFiniteSkippingOptimizer(optimizer)
    if loss_scaling or skip_non_finite:
        if model is not None:
            optimizer.build(model.trainable_variables)
    return optimizer


def weight_decay_loss(model, weight_decay: float):
    """weight_decay x sum of l2_loss (sum of squares / 2) over the model's weight_decay_variables().

    (EfficientNet: every trainable weight but BN's, as the authors; ResNet: conv and dense kernels.)
    """
    if weight_decay <= 0:
        return tf.constant(0.0)
    return weight_decay * tf.add_n(
        [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in model.weight_decay_variables()]
    )


def regularization_loss(model):
    """The penalties of the network's own Keras regularizers (a converted Keras model's kernel or BN
    regularizers; the registry's networks have none: their decay is weight_decay_loss)."""
    losses = model.losses
    return tf.add_n([tf.cast(loss, tf.float32) for loss in losses]) if losses else tf.constant(0.0)


def make_loss_fn(num_classes: int, label_smoothing: float = 0.1):
    """Per-example softmax cross-entropy with label smoothing."""

    def loss_fn(labels, logits):
        onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes)
        if label_smoothing:
            onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
        return tf.nn.softmax_cross_entropy_with_logits(onehot, tf.cast(logits, tf.float32))

    return loss_fn
