"""The train step: attack + forward + backward + update, inside `strategy.run`.

One `tf.function` runs `steps_per_loop` steps (a graph loop) so TPUs stay fed;
each replica computes its share of the loss scaled by the GLOBAL batch, the
optimizer sums gradients across replicas, and the EMA and step counter are
updated in cross-replica context.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from advprop_tf.attacks.pgd import steps_for_epsilon
from advprop_tf.methods import AttackConfig, StepContext, add_gradients, scheduled_epsilon
from advprop_tf.training.optimization import make_loss_fn, weight_decay_loss


@dataclasses.dataclass
class StepConfig:
    global_batch_size: int
    num_classes: int
    label_smoothing: float = 0.1
    weight_decay: float = 1e-5
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    epsilon_schedule: tuple | None = None  # ((fraction, epsilon), ...) fine-grained AdvProp
    total_steps: int = 1
    clean_weight: float = 1.0
    adv_weight: float = 1.0
    adv_fraction: float = 0.2  # fast_advprop: attacked share of each batch
    noisy_weight: float = 0.5  # fast_advprop: weight of the attack's own pass
    seed: int = 0
    jit_compile: bool = False
    skip_non_finite: bool = False  # a step with a non-finite loss changes nothing (pair with a LossScaleOptimizer)


class TrainStep:
    """Builds and holds the compiled training function for one model/method/optimizer."""

    def __init__(self, model, method, optimizer, config: StepConfig, strategy=None, ema=None):
        self.model = model
        self.method = method
        self.optimizer = optimizer
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.ema = ema
        self.loss_fn = make_loss_fn(config.num_classes, config.label_smoothing)
        with self.strategy.scope():
            self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        # XLA compiles attack + forward + backward as one nested function. Without
        # it nothing is nested: replica-context BN updates must not sit in a
        # nested tf.function under MirroredStrategy.
        if config.jit_compile:
            self._compute = tf.function(self._compute_gradients, jit_compile=True)
        else:
            self._compute = self._compute_gradients
        self.run_loop = tf.function(self._run_loop)
        self.run_batch = tf.function(self._run_batch)

    @property
    def current_step(self) -> int:
        return int(self.global_step.numpy())

    # ----------------------------------------------------------- replica side
    def _context(self, step):
        cfg = self.config
        epsilon = num_steps = None
        if cfg.epsilon_schedule:
            epsilon = scheduled_epsilon(cfg.epsilon_schedule, step, cfg.total_steps)
            num_steps = cfg.attack.num_steps if cfg.attack.fixed_num_steps else steps_for_epsilon(epsilon)
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = tf.stack([
            tf.constant(cfg.seed, tf.int32),
            tf.cast(step, tf.int32) * 1024 + tf.cast(replica, tf.int32),
        ])
        return StepContext(
            loss_fn=self.loss_fn, attack=cfg.attack, epsilon=epsilon, num_steps=num_steps,
            seed=seed, clean_weight=cfg.clean_weight, adv_weight=cfg.adv_weight,
            adv_fraction=cfg.adv_fraction, noisy_weight=cfg.noisy_weight, scale_loss=self.optimizer.scale_loss,
        )

    def _compute_gradients(self, images, labels, step):
        cfg = self.config
        num_replicas = self.strategy.num_replicas_in_sync
        variables = self.model.trainable_variables
        ctx = self._context(step)
        if getattr(self.method, "computes_gradients", False):
            loss, grads, metrics = self.method(self.model, images, labels, ctx)
            with tf.GradientTape() as tape:
                decay = weight_decay_loss(self.model, cfg.weight_decay) / num_replicas
                scaled = self.optimizer.scale_loss(decay)
            loss += decay
            grads = add_gradients(grads, tape.gradient(scaled, variables))
        else:
            with tf.GradientTape() as tape:
                ctx.pause_recording = tape.stop_recording
                loss_sum, metrics = self.method(self.model, images, labels, ctx)
                loss = loss_sum / cfg.global_batch_size
                loss += weight_decay_loss(self.model, cfg.weight_decay) / num_replicas
                scaled = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, variables)
        sums = {k: tf.reduce_sum(v) for k, v in metrics.items()}
        sums["loss"] = loss
        sums["examples"] = tf.cast(tf.shape(labels)[0], tf.float32)
        sums["non_finite"] = 1.0 - tf.cast(tf.math.is_finite(loss), tf.float32)
        return grads, sums

    def _replica_step(self, images, labels, step):
        if self.config.skip_non_finite:
            return self._replica_step_skipping_non_finite(images, labels, step)
        return self._apply(*self._compute(images, labels, step))

    def _replica_step_skipping_non_finite(self, images, labels, step):
        """As _replica_step, but a non-finite loss on any replica leaves BN statistics as they were.

        (The LossScaleOptimizer skips the weight update itself.)
        """
        statistics = self.model.non_trainable_variables
        saved = [tf.identity(tf.convert_to_tensor(v)) for v in statistics]
        with tf.control_dependencies(saved):
            grads, sums = self._compute(images, labels, step)
        ctx = tf.distribute.get_replica_context()
        bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, sums["non_finite"]) > 0
        restores = [variable.assign(tf.where(bad, value, tf.convert_to_tensor(variable)))
                    for variable, value in zip(statistics, saved)]
        # Every replica finishes this all-reduce before the gradients' one.
        with tf.control_dependencies(restores):
            grads = [None if g is None else tf.identity(g) for g in grads]
        return self._apply(grads, sums)

    def _apply(self, grads, sums):
        # Variables the method does not use (auxiliary BNs of single-BN
        # methods) have no gradient: leave them and their optimizer slots alone.
        pairs = [(g, v) for g, v in zip(grads, self.model.trainable_variables) if g is not None]
        self.optimizer.apply_gradients(pairs)
        return sums

    # ------------------------------------------------------ cross-replica side
    def _one_step(self, images, labels):
        step = self.global_step.read_value()
        per_replica = self.strategy.run(self._replica_step, args=(images, labels, step))
        sums = {
            k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for k, v in per_replica.items()
        }
        self.global_step.assign_add(1)
        if self.ema is not None:
            self.ema.update(self.global_step, hold=sums["non_finite"] > 0 if self.config.skip_non_finite else None)
        return sums

    def _run_batch(self, images, labels):
        """One step on an already distributed (or, single device, plain) batch."""
        return self._one_step(images, labels)

    def _run_loop(self, iterator, num_steps):
        """`num_steps` steps from a distributed iterator; returns summed metrics."""
        images, labels = next(iterator)
        totals = self._one_step(images, labels)
        for _ in tf.range(num_steps - 1):
            images, labels = next(iterator)
            sums = self._one_step(images, labels)
            totals = {k: totals[k] + sums[k] for k in totals}
        return totals
