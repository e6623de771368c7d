"""The custom training loop: same code under the default, Mirrored, MultiWorker and TPU strategies.

run_training(cfg) builds the run from its parts (builders.py), resumes from
the newest checkpoint of cfg.model_dir (run_dir.py owns that directory),
trains to exactly the requested steps with checkpoints and evaluations on
exact step boundaries, stops cleanly on preemption (preemption.py), evaluates
with the EMA weights and the main BN (evaluation.py, the same loop as
`python -m advprop_tf.evaluate`), and exports the inference network.
"""

from __future__ import annotations

import hashlib
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from advprop_tf import evaluation
from advprop_tf.data.pipeline import DecodeStats, check_readable, eval_dataset, train_dataset
from advprop_tf.data.sources import SourceError
from advprop_tf.methods import attacked_count
from advprop_tf.models.base import WeightsByPath
from advprop_tf.serving import export
from advprop_tf.training import builders
from advprop_tf.training.preemption import SigtermWatcher
from advprop_tf.training.step import compiles_update
from advprop_tf.training.run_dir import EVAL_RESULTS, TRAIN_STATS, RunDir, make_run_config
from advprop_tf.training.strategy import make_strategy, multi_worker_resolver, worker_role


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


def weights_fingerprint(model) -> str:
    """A short hash of every weight's value: equal on all workers of a healthy multi-worker run."""
    digest = hashlib.sha1()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()[:16]


def _format_eta(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _TrainTiming:
    """Training wall time and steady images/s, accumulated over resumes in train_stats.json."""

    def __init__(self, run_dir: RunDir, images_per_step, total_steps):
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        previous = run_dir.read_stats()
        self.seconds = previous.get("train_seconds", 0.0)
        self.steady_steps = previous.get("steady_steps", 0)
        self.steady_seconds = previous.get("steady_seconds", 0.0)

    def add(self, steps, seconds, first):
        self.seconds += seconds
        if not first:  # the first call of a run includes tracing
            self.steady_steps += steps
            self.steady_seconds += seconds

    def write(self, step):
        rate = self.steady_steps * self.images_per_step / self.steady_seconds if self.steady_seconds else None
        self.run_dir.write_json(TRAIN_STATS, {
            "steps": step, "total_steps": self.total_steps, "finished": step >= self.total_steps,
            "train_seconds": round(self.seconds, 1), "steady_steps": self.steady_steps,
            "steady_seconds": round(self.steady_seconds, 2), "images_per_second": rate})


class Trainer:
    """Everything one training run holds; `run()` trains, `evaluate()` measures."""

    def __init__(self, cfg, strategy=None):
        self.cfg = cfg
        self.strategy = strategy or make_strategy(cfg.tpu, cfg.num_gpus, cfg.worker_hosts, cfg.task_index)
        self.run_dir = RunDir(cfg.model_dir, *worker_role(self.strategy))
        changed = self.run_dir.check_resume(builders.meaning_flags(cfg), cfg.allow_config_change)
        replicas = self.strategy.num_replicas_in_sync
        if cfg.train_batch_size % replicas:
            raise ValueError(
                f"--train_batch_size={cfg.train_batch_size} is not divisible by the {replicas} replicas"
            )
        if cfg.jit_compile and cfg.sync_bn and not compiles_update(self.strategy):
            raise ValueError(
                "--sync_bn: cannot be combined with --jit_compile on several GPU/CPU replicas (its all-reduce "
                "inside the compiled part goes through tf.distribute's merge_call); on one replica and on "
                "TPUs (whose all-reduce is an XLA op) it can"
            )
        if cfg.mixed_precision != "none":
            keras.mixed_precision.set_global_policy(f"mixed_{cfg.mixed_precision}")
        self.source = builders.build_source(cfg)
        check_readable(self.source)
        self.num_classes = builders.model_num_classes(cfg, self.source)
        length = builders.training_length(cfg, self.source, replicas)
        self.steps_per_epoch, self.total_steps = length.steps_per_epoch, length.total_steps
        self.per_replica_batch = builders.images_per_replica(cfg, replicas)
        self.images_per_step = self.per_replica_batch * replicas
        if cfg.method == "fast_advprop":
            clean = cfg.train_batch_size // replicas
            logging.info("fast_advprop: each replica reads %d images, its %d clean ones (--train_batch_size=%d over "
                         "%d replicas) and %d attacked on top (--adv_fraction=%g of those read); every epoch count "
                         "divided by %.4f (attacked fraction x attack steps + 1, --match_vanilla_budget): %d steps",
                         self.per_replica_batch, clean, cfg.train_batch_size, replicas,
                         attacked_count(self.per_replica_batch, cfg.adv_fraction), cfg.adv_fraction,
                         length.budget_scale, self.total_steps)
        self.decode_stats = DecodeStats()
        self.seed = self._agreed(self.run_dir.seed(cfg.seed))
        if cfg.seed is not None:
            keras.utils.set_random_seed(cfg.seed)  # reproducible initialization

        with self.strategy.scope():
            self.model = builders.build_model(cfg, self.num_classes)
            self.schedule, self.optimizer, self.ema = builders.build_optimization(cfg, self.model, length)
            self.train_step = builders.build_train_step(
                cfg, self.model, self.optimizer, self.ema, self.strategy,
                num_classes=self.num_classes, total_steps=self.total_steps, seed=self.seed)
        self.resolution = self.model.resolution
        self.domains = tuple(self.model.domains)
        self.views = tuple(d for d in self.domains[1:] if not d.startswith("adv"))
        self._resume_step = 0
        self.train_iterator = self._make_iterator()
        tracked = dict(model=self.model, model_weights=WeightsByPath(self.model), optimizer=self.optimizer,
                       step=self.train_step.global_step,
                       skipped_images=self.decode_stats.skipped)
        if self.ema is not None:
            tracked["ema"] = self.ema
        # The iterator's position is saved when its pipeline is stateless (no
        # keras-cv RandAugment) and the strategy's iterator supports it (the
        # default strategy's does; Mirrored/TPU ones do not). Otherwise a
        # resume skips the consumed elements (see _train_input), as it does when
        # an allowed config change makes the saved iterator unusable.
        self.iterator_saved = (
            cfg.checkpoint_input_pipeline and cfg.augment != "keras_cv_randaugment"
            and not set(changed) & {"train_batch_size", "dataset", "resolution", "aux_domains", "method"}
            and isinstance(self.train_iterator, tf.__internal__.tracking.Trackable)
        )
        if self.iterator_saved:
            tracked["train_iterator"] = self.train_iterator
        self.checkpoint = tf.train.Checkpoint(**tracked)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.run_dir.checkpoint_dir,
                                                  max_to_keep=cfg.keep_checkpoints)
        self._saved = None  # (step, checkpoint path) of the newest checkpoint written or restored
        self.results = None
        self.export_path = None
        self.writer = self.run_dir.summary_writer("train")
        self.eval_writer = self.run_dir.summary_writer("eval")

    def _agreed(self, value: int) -> int:
        """Replica 0's (the chief's) `value`, so that all workers of a cluster use one seed."""
        if multi_worker_resolver(self.strategy) is not None:
            values = self.strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(value if ctx.replica_id_in_sync_group == 0 else 0, tf.int64))
            return int(self.strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None))
        return value

    # ------------------------------------------------------------------ input
    def _make_iterator(self):
        return iter(self.strategy.distribute_datasets_from_function(self._train_input))

    def _train_input(self, ctx):
        # Each input pipeline (one per worker) feeds all of its local replicas:
        # after `step` steps it has produced step x global batch / pipelines examples.
        skip = self._resume_step * self.images_per_step // ctx.num_input_pipelines
        return train_dataset(
            self.source, self.resolution, self.per_replica_batch,
            augment=self.cfg.augment, randaugment_layers=self.cfg.randaugment_layers,
            randaugment_magnitude=self.cfg.randaugment_magnitude, views=self.views,
            seed=self.seed, shuffle_buffer=self.cfg.shuffle_buffer, stats=self.decode_stats,
            skip_examples=skip, crop_min_area=self.cfg.crop_min_area, input_context=ctx,
        )

    def _eval_input(self):
        """Per-replica batches padded to full size (label -1, not counted), sharded by worker."""
        per_replica = -(-self.cfg.eval_batch_size // self.strategy.num_replicas_in_sync)

        def dataset_fn(ctx):
            return eval_dataset(self.source, self.resolution, per_replica, input_context=ctx, pad_to_batch=True,
                                batches_multiple_of=ctx.num_replicas_in_sync // ctx.num_input_pipelines,
                                crop=self.cfg.eval_crop)

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    # ---------------------------------------------------------------- restore
    def restore(self):
        """Resume from the run's newest checkpoint (or --init_checkpoint); returns the step."""
        latest = self.run_dir.restore_newest(lambda path: self.checkpoint.restore(path).assert_existing_objects_matched())
        if latest:
            step = self.train_step.current_step
            self._saved = (step, latest)
            logging.info("resumed from %s at step %d", latest, step)
            if not self.iterator_saved and step:
                self._resume_step = step
                self.train_iterator = self._make_iterator()
        elif self.cfg.init_checkpoint:
            self.initialize(self.cfg.init_checkpoint)
        return self.train_step.current_step

    def initialize(self, path):
        """Weights from a pretrained source (--init_checkpoint) at step 0; the EMA starts from them."""
        from advprop_tf.training.initialization import initialize_from

        description = initialize_from(self.model, path, skip_head=self.cfg.init_skip_head,
                                      use_ema=self.cfg.init_use_ema)
        if self.ema is not None:
            self.ema.reset()
        logging.info("initialized from %s", description)

    def save(self):
        """Checkpoint the current step (every worker saves; non-chief ones in their private directory)."""
        step = self.train_step.current_step
        if self._saved is not None and self._saved[0] == step:
            return self._saved[1]
        path = self.manager.save(checkpoint_number=step)
        self._saved = (step, path)
        return path

    def _record_start(self):
        cfg = self.cfg
        self.run_dir.record_start(
            make_run_config(self.model, self.source.class_names, cfg.method, cfg.dataset,
                            builders.data_options(cfg), builders.meaning_flags(cfg)),
            self.seed)

    # ------------------------------------------------------------------ train
    def _loop_length(self, step):
        """Steps of the next host loop: it ends on the next checkpoint or evaluation boundary."""
        n = min(self.cfg.steps_per_loop, self.total_steps - step)
        for every in (self.cfg.checkpoint_every_steps, self.cfg.eval_every_steps):
            if every:
                n = min(n, every - step % every)
        return n

    def run(self):
        """Train to total_steps; returns the final eval results (or None when preempted)."""
        try:
            return self._run()
        finally:
            self.run_dir.cleanup()

    def _run(self):
        cfg = self.cfg
        step = self.restore()
        self._record_start()  # after the restore: a failed start changes nothing on disk
        started, start_step = time.time(), step
        timing = _TrainTiming(self.run_dir, self.images_per_step, self.total_steps)
        watcher = SigtermWatcher(self.train_step.request_stop)
        logging.info("training steps %d to %d, host loops of up to %d steps", step, self.total_steps, cfg.steps_per_loop)
        try:
            while step < self.total_steps:
                n = self._loop_length(step)
                loop_start = time.time()
                try:
                    sums = self.train_step.run_loop(self.train_iterator, tf.constant(n))
                except tf.errors.OutOfRangeError:
                    raise SourceError(
                        f"the training data of {cfg.dataset!r} ran dry: no image could be decoded"
                    ) from None
                sums = {k: float(v) for k, v in sums.items()}
                done = self.train_step.current_step - step
                step += done
                if sums["non_finite"] > 0 and cfg.on_nan == "stop":
                    raise NonFiniteLossError(
                        f"loss is not finite at step {step} (within the last {done} steps); stopped "
                        f"without saving. The last good checkpoint is {self.run_dir.latest_checkpoint()}. "
                        "Lower --base_learning_rate, or pass --on_nan=skip to skip such steps."
                    )
                elapsed = time.time() - loop_start
                timing.add(done, elapsed, first=step - done == start_step)
                self._log(step, done, sums, self.images_per_step * done / elapsed,
                          (time.time() - started) / max(1, step - start_step) * (self.total_steps - step))
                if self.train_step.stop_requested():  # this worker's SIGTERM or another's, agreed by all
                    path = self.save()
                    timing.write(step)
                    logging.warning("SIGTERM: saved %s at step %d; exiting (weights fingerprint %s)",
                                    path, step, weights_fingerprint(self.model))
                    return None
                if step % cfg.checkpoint_every_steps == 0 or step >= self.total_steps:
                    self.save()
                    timing.write(step)
                if cfg.eval_every_steps and step % cfg.eval_every_steps == 0 and step < self.total_steps:
                    self.evaluate()
        finally:
            watcher.close()
        self.save()
        timing.write(step)
        logging.info("trained to step %d (weights fingerprint %s)", step, weights_fingerprint(self.model))
        results = self.evaluate(final=True)
        if cfg.export and self.run_dir.is_chief:
            self.export_path = export(cfg.model_dir, self.run_dir.export_dir, use_ema=self.ema is not None)
            logging.info("exported the main-BN inference model to %s", self.export_path)
        return results

    def _log(self, step, n, sums, images_per_second, eta_seconds):
        lr = float(self.schedule(step))
        parts = [f"step {step}/{self.total_steps}", f"loss {sums['loss'] / n:.4f}"]
        scalars = {"loss": sums["loss"] / n, "learning_rate": lr, "images_per_second": images_per_second}
        for key in sorted(sums):
            if key.endswith("_correct"):
                name = key[: -len("_correct")]
                # a method that trains on parts of the batch (fast_advprop) counts each part's examples
                examples = max(sums.get(f"{name}_examples", sums["examples"]), 1.0)
                scalars[f"{name}/accuracy"] = sums[key] / examples
                scalars[f"{name}/loss"] = sums[f"{name}_loss"] / examples
                parts.append(f"{name} acc {sums[key] / examples:.3f}")
        skipped = int(self.decode_stats.skipped.numpy())
        parts += [f"lr {lr:.5f}", f"{images_per_second:.1f} img/s", f"ETA {_format_eta(eta_seconds)}"]
        if skipped:
            parts.append(f"skipped {skipped} corrupt images")
        logging.info(" | ".join(parts))
        with self.writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
            tf.summary.scalar("skipped_images", skipped)

    # --------------------------------------------------------------- evaluate
    def evaluate(self, final=False, domain=None):
        """Top-1/top-5 on the eval split with the EMA weights and `domain`'s BN (the main one by default)."""
        if "validation" not in self.source.splits:
            logging.warning("no validation split in %s: skipping evaluation", self.cfg.dataset)
            return None
        domain = domain or self.model.main_domain
        step = self.train_step.current_step
        model = self.model

        def logits_fn(pixels):
            return tf.cast(model(pixels, training=False, domain=domain), tf.float32)

        classifier = evaluation.Classifier(logits_fn, self.resolution, self.num_classes, {
            "kind": "training", "model": model.model_name, "domain": domain, "ema": self.ema is not None,
            "step": step, "method": self.cfg.method})
        if self.ema is not None:
            self.ema.swap()
        try:
            measured = evaluation.evaluate(classifier, self._eval_input(), strategy=self.strategy,
                                           max_batches=self.cfg.eval_steps or None)
        finally:
            if self.ema is not None:
                self.ema.swap()
        results = {"top_1": measured["clean"]["top_1"], "top_5": measured["clean"]["top_5"],
                   "examples": measured["examples"], "step": step, "domain": domain, "ema": self.ema is not None}
        logging.info("eval at step %d (%s BN%s): top-1 %.4f top-5 %.4f on %d images", step, domain,
                     ", EMA" if self.ema is not None else "", results["top_1"], results["top_5"],
                     results["examples"])
        with self.eval_writer.as_default(step=step):
            tf.summary.scalar("top_1", results["top_1"])
            tf.summary.scalar("top_5", results["top_5"])
        if final:
            self.run_dir.write_json(EVAL_RESULTS, results)
        return results


def run_training(cfg, strategy=None):
    """Train (or resume) as `cfg` says; returns the Trainer after the run."""
    trainer = Trainer(cfg, strategy)
    trainer.results = trainer.run()
    return trainer
