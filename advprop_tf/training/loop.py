"""The custom training loop: same code under the default, Mirrored, MultiWorker and TPU strategies.

`Trainer(config)` builds a run from named parts: its inputs (inputs.py), its
network, optimizer, EMA and compiled step (builders.py, step.py), its
checkpoints (checkpointing.py, in the run directory that run_dir.py owns) and
its progress reporting (progress.py). `run()` resumes from the newest
checkpoint that restores, trains to exactly the requested steps with
checkpoints and evaluations on exact step boundaries, stops within a step on
SIGTERM (preemption.py), and evaluates with the EMA weights and the main BN
(evaluation/, the same loop as `python -m advprop_tf.evaluate`). Exporting is
the command line's next step (train.py), not the loop's.
"""

from __future__ import annotations

import hashlib
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from advprop_tf import evaluation
from advprop_tf.config import TrainConfig
from advprop_tf.data.pipeline import check_readable
from advprop_tf.data.sources import SourceError
from advprop_tf.errors import ConfigError
from advprop_tf.training import builders
from advprop_tf.training.checkpointing import Checkpoints
from advprop_tf.training.inputs import TrainInputs
from advprop_tf.training.preemption import SigtermWatcher
from advprop_tf.training.progress import Progress
from advprop_tf.training.run_dir import EVAL_RESULTS, RunDir, make_run_config
from advprop_tf.training.step import compiles_update
from advprop_tf.training.strategy import make_strategy, multi_worker_resolver, worker_role


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


# What a worker's collectives raise once a peer is gone (killed, preempted, its host down): the run cannot go on,
# and a restart of every worker with the same command resumes it from the newest checkpoint.
PEER_LOST_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError)


class PeerLostError(RuntimeError):
    """Another worker of the cluster stopped answering in the middle of training; `checkpoint` resumes it."""

    def __init__(self, message, checkpoint):
        super().__init__(message)
        self.checkpoint = checkpoint


def weights_fingerprint(model) -> str:
    """A short hash of every weight's value: equal on all workers of a healthy multi-worker run."""
    digest = hashlib.sha1()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()[:16]


def check_strategy(config: TrainConfig, strategy) -> None:
    """ConfigError for what this strategy cannot run."""
    replicas = strategy.num_replicas_in_sync
    if config.optimization.train_batch_size % replicas:
        raise ConfigError("train_batch_size", f"{config.optimization.train_batch_size} is not divisible by the "
                          f"{replicas} replicas")
    if config.optimization.jit_compile and config.model.sync_bn and not compiles_update(strategy):
        raise ConfigError("sync_bn", "cannot be combined with --jit_compile on several GPU/CPU replicas (its "
                          "all-reduce inside the compiled part goes through tf.distribute's merge_call); on one "
                          "replica and on TPUs (whose all-reduce is an XLA op) it can")


class Trainer:
    """One training run; `run()` trains, `evaluate()` measures."""

    def __init__(self, config: TrainConfig, strategy=None):
        self.config = config
        s = config.strategy
        self.strategy = strategy or make_strategy(s.tpu, s.num_gpus, s.worker_hosts, s.task_index)
        self.run_dir = RunDir(config.run.model_dir, *worker_role(self.strategy))
        changed = self.run_dir.check_resume(config.meaning(), config.run.allow_config_change)
        check_strategy(config, self.strategy)
        if config.optimization.mixed_precision != "none":
            keras.mixed_precision.set_global_policy(f"mixed_{config.optimization.mixed_precision}")
        self.source = builders.build_source(config)
        check_readable(self.source)
        self.num_classes = builders.model_num_classes(config, self.source)
        replicas = self.strategy.num_replicas_in_sync
        length = builders.training_length(config, self.source, replicas)
        self.steps_per_epoch, self.total_steps = length.steps_per_epoch, length.total_steps
        note = config.method.record.describe(config.method, config.optimization.train_batch_size // replicas, replicas)
        if note:
            logging.info("%s: %d steps", note, self.total_steps)
        self.seed = self._agreed(self.run_dir.seed(config.run.seed))
        if config.run.seed is not None:
            keras.utils.set_random_seed(config.run.seed)  # reproducible initialization
        with self.strategy.scope():
            self.model = builders.build_model(config, self.num_classes)
            self.schedule, self.optimizer, self.ema = builders.build_optimization(config, self.model, length)
            self.train_step = builders.build_train_step(
                config, self.model, self.optimizer, self.ema, self.strategy,
                num_classes=self.num_classes, total_steps=self.total_steps, seed=self.seed)
        self.inputs = TrainInputs(config, self.source, self.strategy, self.model.resolution,
                                  builders.images_per_replica(config, replicas), self.seed)
        self.train_iterator = self.inputs.train_iterator()
        self.iterator_saved = self.inputs.iterator_can_be_saved(self.train_iterator, changed)
        extra = {"train_iterator": self.train_iterator} if self.iterator_saved else {}
        self.checkpoints = Checkpoints(self.run_dir, self.model, self.optimizer, self.train_step.global_step,
                                       self.ema, config.run.keep_checkpoints,
                                       skipped_images=self.inputs.decode_stats.skipped, **extra)
        self.progress = Progress(self.run_dir, self.schedule, self.inputs.images_per_step, self.total_steps,
                                 self.inputs.decode_stats.skipped)
        self.results = None
        self.stop_reason = None  # why the run ended before total_steps (a SIGTERM), else None
        self.resume_checkpoint = None  # then: the chief's checkpoint a restart resumes from
        self.no_evaluation_reason = None  # why the final evaluation did not run, else None

    def _agreed(self, value: int) -> int:
        """Replica 0's (the chief's) `value`, so that all workers of a cluster use one seed."""
        if multi_worker_resolver(self.strategy) is not None:
            values = self.strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(value if ctx.replica_id_in_sync_group == 0 else 0, tf.int64))
            return int(self.strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None))
        return value

    @property
    def step(self) -> int:
        return self.train_step.current_step

    @property
    def finished(self) -> bool:
        """Whether training reached total_steps (only then does a command exit 0)."""
        return self.step >= self.total_steps

    # ---------------------------------------------------------------- restore
    def restore(self) -> int:
        """Resume from the run's newest checkpoint that restores (or start from --init_checkpoint); the step."""
        latest = self.checkpoints.restore(lambda: self.step)
        if latest:
            logging.info("resumed from %s at step %d", latest, self.step)
            if not self.iterator_saved and self.step:
                self.train_iterator = self.inputs.train_iterator(resume_step=self.step)
        elif self.config.run.init_checkpoint:
            self.initialize(self.config.run.init_checkpoint)
        return self.step

    def initialize(self, path):
        """Weights from a pretrained source (--init_checkpoint) at step 0; the EMA starts from them."""
        from advprop_tf.training.initialization import initialize_from

        run = self.config.run
        description = initialize_from(self.model, path, skip_head=run.init_skip_head, use_ema=run.init_use_ema)
        if self.ema is not None:
            self.ema.reset()
        logging.info("initialized from %s", description)

    def save(self) -> str:
        return self.checkpoints.save(self.step)

    # ------------------------------------------------------------------ train
    def _loop_length(self, step):
        """Steps of the next host loop: it ends on the next checkpoint or evaluation boundary."""
        run = self.config.run
        n = min(run.steps_per_loop, self.total_steps - step)
        for every in (run.checkpoint_every_steps, run.eval_every_steps):
            if every:
                n = min(n, every - step % every)
        return n

    def run(self):
        """Train to total_steps; returns the final eval results (or None when stopped by SIGTERM)."""
        try:
            return self._run()
        finally:
            self.run_dir.cleanup()

    def _run(self):
        run = self.config.run
        step = self.restore()
        self.run_dir.record_start(make_run_config(self.model, self.source.class_names, self.config.method.method,
                                                  self.config.data.dataset, builders.data_options(self.config),
                                                  self.config.meaning()), self.seed)
        self.progress.start(step)
        watcher = SigtermWatcher(self.train_step.request_stop)
        logging.info("training steps %d to %d, host loops of up to %d steps", step, self.total_steps, run.steps_per_loop)
        try:
            while step < self.total_steps:
                sums, steps, seconds = self._host_loop(self._loop_length(step))
                step += steps
                self.progress.host_loop(step, steps, seconds, sums)
                if self.train_step.stop_requested() and step < self.total_steps:  # any worker's SIGTERM, agreed
                    path = self.save()
                    self.progress.write_stats(step)
                    self.stop_reason = "SIGTERM" if watcher.requested else "SIGTERM to another worker"
                    self.resume_checkpoint = self.run_dir.chief_checkpoint_of(path)
                    logging.warning("%s: saved %s at step %d; exiting (weights fingerprint %s)",
                                    self.stop_reason, path, step, weights_fingerprint(self.model))
                    return None
                if step % run.checkpoint_every_steps == 0 or step >= self.total_steps:
                    self.save()
                    self.progress.write_stats(step)
                if run.eval_every_steps and step % run.eval_every_steps == 0 and step < self.total_steps:
                    self.evaluate()
        finally:
            watcher.close()
        self.save()
        self.progress.write_stats(step)
        logging.info("trained to step %d (weights fingerprint %s)", step, weights_fingerprint(self.model))
        return self.evaluate(final=True)

    def _host_loop(self, n):
        """Up to `n` steps in one graph loop: (metric sums, steps run, seconds)."""
        before, started = self.step, time.time()
        try:
            sums = self.train_step.run_loop(self.train_iterator, tf.constant(n))
        except tf.errors.OutOfRangeError:
            raise SourceError(f"the training data of {self.config.data.dataset!r} ran dry: no image could be "
                              "decoded") from None
        except PEER_LOST_ERRORS as e:
            if multi_worker_resolver(self.strategy) is None:
                raise
            raise PeerLostError(f"another worker stopped answering after step {before} ({type(e).__name__})",
                                self.run_dir.latest_checkpoint()) from None
        sums = {k: float(v) for k, v in sums.items()}
        steps = self.step - before
        if sums["non_finite"] > 0 and self.config.optimization.on_nan == "stop":
            raise NonFiniteLossError(
                f"loss is not finite at step {self.step} (within the last {steps} steps); stopped without saving. "
                f"The last good checkpoint is {self.run_dir.latest_checkpoint()}. Lower --base_learning_rate, or "
                "pass --on_nan=skip to skip such steps.")
        return sums, steps, time.time() - started

    # --------------------------------------------------------------- evaluate
    def evaluate(self, final=False, domain=None):
        """Top-1/top-5 on the eval split with the EMA weights and `domain`'s BN (the main one by default)."""
        if "validation" not in self.source.splits:
            self.no_evaluation_reason = f"--dataset={self.config.data.dataset} has no validation split"
            logging.warning("%s: skipping evaluation", self.no_evaluation_reason)
            return None
        domain = domain or self.model.main_domain
        step, model = self.step, self.model

        def logits_fn(pixels):
            return tf.cast(model(pixels, training=False, domain=domain), tf.float32)

        classifier = evaluation.Classifier(logits_fn, model.resolution, self.num_classes, {
            "kind": "training", "model": model.model_name, "domain": domain, "ema": self.ema is not None,
            "step": step, "method": self.config.method.method})
        if self.ema is not None:
            self.ema.swap()
        try:
            measured = evaluation.evaluate(classifier, self.inputs.eval_dataset(), strategy=self.strategy,
                                           max_batches=self.config.run.eval_steps or None)
        finally:
            if self.ema is not None:
                self.ema.swap()
        clean = measured[evaluation.CLEAN_IMAGES]
        results = {"top_1": clean["top_1"], "top_5": clean["top_5"], "examples": measured["examples"], "step": step,
                   "domain": domain, "ema": self.ema is not None}
        logging.info("eval at step %d (%s BN%s): top-1 %.4f top-5 %.4f on %d images", step, domain,
                     ", EMA" if self.ema is not None else "", results["top_1"], results["top_5"], results["examples"])
        self.progress.evaluation(step, results)
        if final:
            self.run_dir.write_json(EVAL_RESULTS, results)
        return results


def run_training(config: TrainConfig, strategy=None) -> Trainer:
    """Train (or resume) as `config` says; returns the Trainer after the run."""
    trainer = Trainer(config, strategy)
    trainer.results = trainer.run()
    return trainer
