"""AdvProp the Keras way: `AdvPropModel(network)` (AdvProp by default, or any registered method), `compile(...)`, `fit(...)`.

`train_step` runs ONE step of a registered method through the very TrainStep
the command line's loop uses (step.py: attack, forward, backward, BN
statistics, optimizer update), so there is one implementation of each method.
It works under `strategy.scope()` (the step's all-reduces are the same) and
with Keras' callbacks: `BackupAndRestore` (also when interrupted mid-epoch: the
model counts its steps and the steps of the current epoch in variables saved
with its weights, and on resume skips the batches of the interrupted epoch
that were already trained; exact when the dataset gives each epoch the same
order), `ModelCheckpoint`, `TensorBoard`. `evaluate()` and `predict()` use the
main BN. The progress bar shows the method's losses and accuracies per part
(clean, adv, ...). The EMA of the command line's loop is not part of it (Keras
optimizers have `use_ema` for the trainable weights).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from advprop_tf.attacks.pgd import AttackConfig
from advprop_tf.domains import DomainSpec
from advprop_tf.methods import DEFAULT_METHOD, get_method
from advprop_tf.training.optimization import make_loss_fn
from advprop_tf.training.step import StepConfig, TrainStep


class _EpochBookkeeping(keras.callbacks.Callback):
    """Records where each epoch starts (in steps), and on a resume within an epoch, how many of its batches
    were trained already. First among the callbacks, so that a backup at an epoch's end already holds it."""

    def __init__(self, model):
        super().__init__()
        self._network_model = model
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        model = self._network_model
        done = model.steps_done
        model.batches_to_skip = done - model.epoch_start if self._first else 0
        self._first = False
        model.epoch_start = done - model.batches_to_skip

    def on_epoch_end(self, epoch, logs=None):
        self._network_model.epoch_start = self._network_model.steps_done


class AdvPropModel(keras.Model):
    """A Keras model that trains `network` (our call contract: the registry's networks or `to_multi_domain`'s)
    with a registered method. Attack and loss settings as the command line's (StepConfig)."""

    def __init__(self, network, method: str = DEFAULT_METHOD, attack: AttackConfig | None = None,
                 label_smoothing: float = 0.1, weight_decay: float = 0.0, clean_loss_weight: float = 1.0,
                 adv_loss_weight: float | None = None, adv_fraction: float = 0.2, noisy_loss_weight: float = 0.5,
                 epsilon_schedule=None, total_steps: int = 1, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.record = get_method(method)
        self.domains = DomainSpec.of(network.domains, generated=self.record.generated_domains)
        self.step_config = StepConfig(
            global_batch_size=None, num_classes=network.num_classes, label_smoothing=label_smoothing,
            weight_decay=weight_decay, attack=self.record.resolve_attack(attack or AttackConfig()),
            epsilon_schedule=epsilon_schedule, total_steps=total_steps, clean_weight=clean_loss_weight,
            adv_weight=self.record.default_adv_weight if adv_loss_weight is None else adv_loss_weight,
            adv_fraction=adv_fraction, noisy_weight=noisy_loss_weight, seed=seed, domains=self.domains)
        self.epoch_start = 0  # steps_done when the current epoch began
        self.batches_to_skip = 0
        self._trackers = {name: keras.metrics.Mean(name=name) for name in self._metric_names()}
        self._eval_trackers = {name: keras.metrics.Mean(name=f"eval_{name}") for name in ("loss", "accuracy")}
        self._loss_fn = make_loss_fn(network.num_classes, label_smoothing)
        # The step counter is the model's from the start, so that load_weights() works before compile() too.
        self._steps_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps_done",
                                       synchronization=tf.VariableSynchronization.ON_READ,
                                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self._step = None
        self._single_step = None
        self.built = True  # the network is built already (BackupAndRestore restores into built models)

    def _metric_names(self):
        parts = self.record.metric_prefixes(self.domains)
        return ["loss"] + [f"{p}_{kind}" for p in parts for kind in ("loss", "acc")]

    @property
    def metrics(self):
        return list(self._trackers.values()) + list(self._eval_trackers.values())

    def call(self, inputs, training=None):
        """Logits through the main BN."""
        return self.network(inputs, training=training)

    def inference_model(self, domain=None):
        """The trained network as plain Keras with one domain's BN (see KerasNetwork.inference_model)."""
        return self.network.inference_model(domain)

    # ------------------------------------------------------------ training
    def compile(self, optimizer="rmsprop", **kwargs):
        """Keras' compile; the step is built here, in the strategy's scope, with the compiled optimizer."""
        super().compile(optimizer=optimizer, **kwargs)
        with self.distribute_strategy.scope():
            self._step = TrainStep(self.network, self.record, self.optimizer, self.step_config, self.distribute_strategy,
                                   step_counter=self._steps_done)

    @property
    def steps_done(self) -> int:
        """Training steps taken (the step's counter: attack and dropout seeds follow it)."""
        return int(self._steps_done.numpy())

    def save_own_variables(self, store):
        """The step counter and the current epoch's first step go with the weights (BackupAndRestore)."""
        super().save_own_variables(store)
        store["steps_done"] = np.array(self.steps_done, np.int64)
        store["epoch_start"] = np.array(self.epoch_start, np.int64)

    def load_own_variables(self, store):
        own = {k: store[k] for k in store.keys() if k not in ("steps_done", "epoch_start")}
        super().load_own_variables(own)
        if "steps_done" in store.keys():
            self._steps_done.assign(int(np.asarray(store["steps_done"])))
            self.epoch_start = int(np.asarray(store["epoch_start"]))

    def train_step(self, data):
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError("AdvPropModel.fit takes no sample_weight or class_weight: the clean and adversarial "
                             "losses are means over the batch (weight the data instead, e.g. by resampling it)")
        if labels is None:
            raise ValueError("AdvPropModel.fit needs (images, labels) batches: the attack needs the labels")
        if self._step is None:
            raise ValueError("compile() the AdvPropModel before fit()")
        sums = self._step._replica_step(images, labels)  # global sums, every replica alike
        self._trackers["loss"].update_state(sums["loss"])
        for name in self._trackers:
            part, _, kind = name.rpartition("_")
            if kind != "acc" or f"{part}_correct" not in sums:
                continue
            examples = tf.maximum(sums.get(f"{part}_examples", sums["examples"]), 1.0)
            self._trackers[name].update_state(sums[f"{part}_correct"] / examples)
            self._trackers[f"{part}_loss"].update_state(sums[f"{part}_loss"] / examples)
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    def test_step(self, data):
        """Loss (with the training's label smoothing) and top-1 through the main BN."""
        images, labels = data[0], data[1]
        logits = self.network(images, training=False)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(labels, tf.int32)), tf.float32)
        self._eval_trackers["loss"].update_state(tf.reduce_mean(self._loss_fn(labels, logits)))
        self._eval_trackers["accuracy"].update_state(tf.reduce_mean(correct))
        return {name: tracker.result() for name, tracker in self._eval_trackers.items()}

    def make_train_function(self, force=False):
        """Keras' train function, skipping (and discarding) the batches of an interrupted epoch already trained."""
        super().make_train_function(force)
        train_function = self.train_function
        if getattr(train_function, "_skips_trained_batches", False):
            return train_function

        def skipping(iterator):
            """One call of Keras' train function covers steps_per_execution batches: a call that falls among the
            already-trained batches discards as many (and trains the rest of its share, when the backup's
            epoch position is not a multiple of them: steps_per_execution changed between the two runs)."""
            if self.batches_to_skip <= 0:
                return train_function(iterator)
            skipped = min(self.batches_to_skip, self.steps_per_execution)
            for _ in range(skipped):
                next(iterator)
            self.batches_to_skip -= skipped
            logs = {name: tracker.result() for name, tracker in self._trackers.items()}
            for _ in range(self.steps_per_execution - skipped):
                logs = self._train_one_batch(next(iterator))
            return logs

        skipping._skips_trained_batches = True
        self.train_function = skipping
        return skipping

    def _train_one_batch(self, data):
        if self._single_step is None:
            strategy = self.distribute_strategy

            def one_step(batch):
                logs = strategy.run(self.train_step, args=(batch,))
                return {name: strategy.experimental_local_results(value)[0] for name, value in logs.items()}

            self._single_step = tf.function(one_step)
        return self._single_step(data)

    def fit(self, *args, callbacks=None, **kwargs):
        callbacks = [_EpochBookkeeping(self)] + list(callbacks or [])
        return super().fit(*args, callbacks=callbacks, **kwargs)
