"""The train step: attack, forward, backward, update, EMA and step counter, all inside `strategy.run`.

One `tf.function` runs up to `steps_per_loop` steps (a graph loop) so that
accelerators stay fed; it stops early, on every worker at the same step, once
`stop_flag` is set (a SIGTERM: preemption.py). Each replica computes its
share of the loss scaled by the GLOBAL batch; the optimizer sums gradients
across replicas.

A replica's step has two parts:
  compute: the method's attack, forward and backward passes -> gradients, the
    new values of the BN moving statistics (collected, not assigned:
    multi_bn.collecting_statistic_updates) and metrics. It writes no variable.
  update: the statistics assigned (averaged across replicas), the optimizer
    step, the EMA of every weight and statistic, the step counter.
Nothing runs in cross-replica context but the loop itself, so under
TPUStrategy the whole step runs on the device. With `jit_compile`, XLA
compiles the whole replica step on one replica (a TPU compiles all of
`strategy.run` anyway); on several GPU/CPU replicas it compiles the compute
part, because there tf.distribute synchronises the update's assignments
through merge_call, which cannot run inside XLA.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from advprop_tf import randomness
from advprop_tf.attacks.pgd import AttackConfig
from advprop_tf.domains import DomainSpec
from advprop_tf.methods import StepContext, add_gradients, scheduled_epsilon
from advprop_tf.models.multi_bn import collecting_statistic_updates
from advprop_tf.training.optimization import make_loss_fn, regularization_loss, weight_decay_loss
from advprop_tf.training.strategy import multi_worker_resolver

DROPOUT_STREAM = 0xD20F  # the dropout masks' seeds are folded from the step's seed with this salt


@dataclasses.dataclass
class StepConfig:
    global_batch_size: int | None  # clean images per step over all replicas; None: the batch's, x replicas
    num_classes: int
    label_smoothing: float = 0.1
    weight_decay: float = 1e-5
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    epsilon_schedule: tuple | None = None  # ((fraction, epsilon), ...) fine-grained AdvProp
    total_steps: int = 1
    clean_weight: float = 1.0
    adv_weight: float = 1.0
    adv_fraction: float = 0.2  # Fast AdvProp: attacked share of each batch
    noisy_weight: float = 0.5  # Fast AdvProp: weight of the attack's own pass
    seed: int = 0
    jit_compile: bool = False
    domains: DomainSpec | None = None  # the network's domains (None: read from model.domains)


def compiles_update(strategy) -> bool:
    """Whether XLA may compile a replica's update too: on one replica, or on TPUs (which compile everything)."""
    return strategy.num_replicas_in_sync == 1 or isinstance(strategy, tf.distribute.TPUStrategy)


class TrainStep:
    """Builds and holds the compiled training function for one model/method/optimizer."""

    def __init__(self, model, method, optimizer, config: StepConfig, strategy=None, ema=None, step_counter=None):
        """`step_counter`: a variable of the caller's to count steps in (a Keras model's, saved with its
        weights), replica-local or mirrored; by default the step makes its own."""
        self.model = model
        self.method = method
        self.optimizer = optimizer
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.ema = ema
        self.loss_fn = make_loss_fn(config.num_classes, config.label_smoothing)
        if step_counter is not None:
            self.global_step = step_counter
        else:
            with self.strategy.scope():
                # Every replica counts the steps itself (identical counts): no communication, and the
                # counter is read where the step runs (on the device).
                self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                                               synchronization=tf.VariableSynchronization.ON_READ,
                                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # The stop flag: a variable created in the strategy's scope (a mirrored one under several replicas),
        # never checkpointed. The SIGTERM watcher sets it from its thread (request_stop); the graph loop reads
        # it on the device before every step after the first (_stop_requested), where the workers agree on it
        # by a SUM over the replicas, so that one worker's flag stops every worker after the same step.
        self.stop_flag = tf.Variable(False, trainable=False, name="stop_requested")
        self._statistics = [v for layer in model.bn_layers() for d in layer.domains
                            for key, v in layer.domain_variables(d).items() if key.startswith("moving")]
        self._statistic_index = {id(v): i for i, v in enumerate(self._statistics)}
        self._multi_worker = multi_worker_resolver(self.strategy) is not None
        self._compute_part = self._compute
        self._replica_part = self._replica_step
        if config.jit_compile:
            if compiles_update(self.strategy):
                self._replica_part = tf.function(self._replica_step, jit_compile=True)
            else:
                self._compute_part = tf.function(self._compute, jit_compile=True)
        self.run_loop = tf.function(self._run_loop)
        self.run_batch = tf.function(self._one_step)
        self.stop_requested = tf.function(self._stop_requested)

    @property
    def current_step(self) -> int:
        return int(self.global_step.numpy())

    def request_stop(self):
        """End the running (or next) graph loop after its current step; safe from another thread."""
        self.stop_flag.assign(True)

    # ----------------------------------------------------------- replica side
    def _context(self, step):
        cfg = self.config
        epsilon = num_steps = None
        if cfg.epsilon_schedule:
            epsilon = scheduled_epsilon(cfg.epsilon_schedule, step, cfg.total_steps)
            num_steps = cfg.attack.steps_for(epsilon)
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = randomness.replica_seed(cfg.seed, step, replica)
        return StepContext(
            loss_fn=self.loss_fn, attack=cfg.attack, epsilon=epsilon, num_steps=num_steps,
            seed=seed, clean_weight=cfg.clean_weight, adv_weight=cfg.adv_weight,
            adv_fraction=cfg.adv_fraction, noisy_weight=cfg.noisy_weight, scale_loss=self.optimizer.scale_loss,
            domains=cfg.domains,
        )

    def _decay(self):
        """The weight decay and the network's own regularizers (once per step; each replica adds 1/replicas)."""
        return weight_decay_loss(self.model, self.config.weight_decay) + regularization_loss(self.model)

    def _gradients(self, images, labels, ctx):
        cfg = self.config
        num_replicas = self.strategy.num_replicas_in_sync
        variables = self.model.trainable_variables
        if self.method.computes_gradients:
            loss, grads, metrics = self.method(self.model, images, labels, ctx)
            with tf.GradientTape() as tape:
                decay = self._decay() / num_replicas
                scaled = self.optimizer.scale_loss(decay)
            loss += decay
            grads = add_gradients(grads, tape.gradient(scaled, variables))
        else:
            with tf.GradientTape() as tape:
                ctx.pause_recording = tape.stop_recording
                loss_sum, metrics = self.method(self.model, images, labels, ctx)
                global_batch = cfg.global_batch_size or tf.cast(tf.shape(labels)[0] * num_replicas, tf.float32)
                loss = loss_sum / global_batch
                loss += self._decay() / num_replicas
                scaled = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, variables)
        sums = {k: tf.reduce_sum(v) for k, v in metrics.items()}
        sums["loss"] = loss
        sums["examples"] = tf.cast(tf.shape(labels)[0], tf.float32)
        # This replica's verdict on its OWN loss and gradients (a float16 step's usual failure is a finite loss
        # whose gradients overflow): summed over the replicas in _update, so every replica skips alike.
        finite = tf.reduce_all([tf.math.is_finite(loss)] + [tf.reduce_all(tf.math.is_finite(g))
                                                            for g in grads if g is not None])
        sums["non_finite"] = 1.0 - tf.cast(finite, tf.float32)
        return grads, sums

    def _compute(self, images, labels, step):
        """(gradients, {statistic index: new value}, metric sums): reads variables, writes none."""
        ctx = self._context(step)
        with collecting_statistic_updates() as updates, randomness.seeded(randomness.fold_in(ctx.seed, DROPOUT_STREAM)):
            grads, sums = self._gradients(images, labels, ctx)
        statistics = {f"{self._statistic_index[id(v)]:05d}": value for v, value in updates.items()}
        return grads, statistics, sums

    def _replica_step(self, images, labels):
        step = tf.cast(tf.convert_to_tensor(self.global_step), tf.int64)
        grads, statistics, sums = self._compute_part(images, labels, step)
        return self._update(grads, statistics, sums, step)

    @property
    def skips_non_finite(self) -> bool:
        """Whether a step with a non-finite loss or gradient changes nothing: with a LossScaleOptimizer (float16's,
        or float32's --on_nan=skip), which skips the weights' update; the statistics and the EMA are held too."""
        return isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)

    def _update(self, grads, statistics, sums, step):
        """Assign the statistics, apply the gradients, move the EMA and the counter; returns the global sums."""
        sums = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, sums)
        bad = sums["non_finite"] > 0  # on any replica: every replica skips alike
        skips = self.skips_non_finite
        for key, value in statistics.items():
            variable = self._statistics[int(key)]
            if skips:
                value = tf.where(bad, tf.convert_to_tensor(variable), value)
            variable.assign(value)
        if skips:
            # Keras' LossScaleOptimizer judges finiteness by ONE replica's gradients (the first, under
            # merge_call; each core its own, on a TPU), assuming they were summed already; they are not. The
            # verdict above is every replica's: poisoning all gradients with it makes every replica (every TPU
            # core) take the same branch, and the scale halve once.
            poison = tf.where(bad, float("nan"), 0.0)
            grads = [None if g is None else g + tf.cast(poison, g.dtype) for g in grads]
        # Variables the method does not use (auxiliary BNs of single-BN
        # methods) have no gradient: leave them and their optimizer slots alone.
        self.optimizer.apply_gradients([(g, v) for g, v in zip(grads, self.model.trainable_variables) if g is not None])
        if skips:
            # One clock: a skipped update leaves the optimizer's `iterations` (the learning-rate schedule's step)
            # behind; it follows the step counter that the epsilon schedule, the EMA, the seeds and the
            # checkpoints read.
            iterations = self.optimizer.iterations
            iterations.assign(tf.cast(step + 1, iterations.dtype))
        self.global_step.assign_add(1)
        if self.ema is not None:
            self.ema.update(step + 1, hold=bad if skips else None)
        return sums

    # ------------------------------------------------------ cross-replica side
    def _one_step(self, images, labels):
        """One step on a distributed (or, on one device, plain) batch; returns the global metric sums."""
        per_replica = self.strategy.run(self._replica_part, args=(images, labels))
        return {k: self.strategy.experimental_local_results(v)[0] for k, v in per_replica.items()}

    def _stop_requested(self):
        """The stop flag, agreed by all workers (any worker's SIGTERM stops them all after the same step): the
        number of replicas whose worker was signalled, summed over all of them."""
        flag = tf.cast(self.stop_flag.read_value(), tf.int32)
        if self._multi_worker:
            values = self.strategy.experimental_distribute_values_from_function(lambda _: tf.identity(flag))
            flag = self.strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)
        return flag > 0

    def _run_loop(self, iterator, num_steps):
        """Up to `num_steps` steps from a distributed iterator (fewer once a stop is requested); summed metrics.

        The step is traced once, as the loop's body: each step's sums are stacked in key order (known once
        the body is traced) into a TensorArray, summed after the loop. Seeding the totals with a first step
        outside the loop would trace, and under XLA compile, the whole step twice."""
        keys = []

        def stacked_sums(images, labels):
            sums = self._one_step(images, labels)
            keys[:] = sorted(sums)
            return tf.stack([tf.cast(sums[k], tf.float32) for k in keys])

        per_step = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=tf.TensorShape([None]))
        for i in tf.range(num_steps):
            if tf.logical_and(i > 0, self._stop_requested()):  # the first step always runs
                break
            per_step = per_step.write(i, stacked_sums(*next(iterator)))  # no loop variables but these two
        totals = tf.reduce_sum(per_step.stack(), axis=0)
        return {k: totals[j] for j, k in enumerate(keys)}
