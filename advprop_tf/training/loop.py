"""The custom training loop: same code under the default, Mirrored, MultiWorker and TPU strategies.

run_training(cfg) builds everything from a config namespace (see
advprop_tf/config.py), resumes from the newest checkpoint in cfg.model_dir,
trains to exactly cfg.train_steps (or epochs), checkpoints periodically and on
SIGTERM, evaluates with the EMA weights and the main BN, and writes
eval_results.json.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import keras
import tensorflow as tf
from absl import logging

from advprop_tf.config import attack_steps, model_domains
from advprop_tf.data.pipeline import DecodeStats, check_readable, eval_dataset, train_dataset
from advprop_tf.data.sources import SourceError, parse_source
from advprop_tf.evaluation import topk_counts
from advprop_tf.export import export, write_run_config
from advprop_tf.methods import AttackConfig, get_method, parse_epsilon_schedule
from advprop_tf.models import build_efficientnet
from advprop_tf.training.ema import ExponentialMovingAverage
from advprop_tf.training.optimization import make_optimizer, make_schedule, scaled_learning_rate
from advprop_tf.training.step import StepConfig, TrainStep
from advprop_tf.training.strategy import make_strategy

IMAGENET_TRAIN_EXAMPLES = 1_281_167


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


class _Preemption:
    """Turns SIGTERM (TPU preemption, Ctrl-C of a scheduler) into a flag the loop checks."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def build_model(cfg, num_classes, domains):
    return build_efficientnet(
        cfg.model, num_classes=num_classes, domains=domains,
        input_normalization=cfg.input_normalization, resolution=cfg.resolution,
        width_coefficient=cfg.width_coefficient, depth_coefficient=cfg.depth_coefficient,
        dropout_rate=cfg.dropout_rate, drop_connect_rate=cfg.drop_connect_rate,
        synchronized_bn=cfg.sync_bn,
    )


def run_seed(cfg):
    """--seed, or the seed this model_dir was started with (kept in seed.txt so a resume continues it)."""
    path = os.path.join(cfg.model_dir, "seed.txt")
    if cfg.seed is not None:
        seed = int(cfg.seed)
    elif tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            return int(f.read().strip())
    else:
        seed = int(time.time_ns() % (2**31 - 1))
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(str(seed))
    return seed


def _format_eta(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _TrainTiming:
    """Training wall time and steady images/s, accumulated over resumes in train_stats.json."""

    def __init__(self, model_dir, images_per_step, total_steps):
        self.total_steps = total_steps
        self.path = os.path.join(model_dir, "train_stats.json")
        self.images_per_step = images_per_step
        previous = {}
        if tf.io.gfile.exists(self.path):
            with tf.io.gfile.GFile(self.path) as f:
                previous = json.load(f)
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
        stats = {"steps": step, "total_steps": self.total_steps, "finished": step >= self.total_steps,
                 "train_seconds": round(self.seconds, 1), "steady_steps": self.steady_steps,
                 "steady_seconds": round(self.steady_seconds, 2), "images_per_second": rate}
        with tf.io.gfile.GFile(self.path, "w") as f:
            json.dump(stats, f, indent=2)


class Trainer:
    """Everything one training run holds; `run()` trains, `evaluate()` measures."""

    def __init__(self, cfg, strategy=None):
        self.cfg = cfg
        tf.io.gfile.makedirs(cfg.model_dir)
        self.strategy = strategy or make_strategy(cfg.tpu, cfg.num_gpus, cfg.worker_hosts, cfg.task_index)
        replicas = self.strategy.num_replicas_in_sync
        if cfg.train_batch_size % replicas:
            raise ValueError(
                f"--train_batch_size={cfg.train_batch_size} is not divisible by the {replicas} replicas"
            )
        if cfg.jit_compile and replicas > 1 and not cfg.tpu:
            raise ValueError(
                "--jit_compile: not supported with several GPU/CPU replicas (BN statistic updates "
                "synchronise replicas inside the step); on TPU the whole step is compiled anyway"
            )
        if cfg.mixed_precision != "none":
            keras.mixed_precision.set_global_policy(f"mixed_{cfg.mixed_precision}")
        self.source = parse_source(
            cfg.dataset, cfg.data_dir, cfg.num_classes, cfg.holdout_fraction,
            synthetic_size=int(math.ceil((cfg.resolution or 224) / 0.875)),
            synthetic_examples=cfg.synthetic_examples, seed=0,
        )
        check_readable(self.source)
        self.num_classes = cfg.num_classes or self.source.num_classes
        self.domains = model_domains(cfg.method, cfg.aux_domains)
        self.views = tuple(d for d in self.domains[1:] if not d.startswith("adv"))
        examples = self.source.num_examples("train") or cfg.num_train_examples or IMAGENET_TRAIN_EXAMPLES
        self.steps_per_epoch = max(1, examples // cfg.train_batch_size)
        self.total_steps = cfg.train_steps or int(math.ceil(cfg.train_epochs * self.steps_per_epoch))
        self.decode_stats = DecodeStats()
        self.seed = run_seed(cfg)
        if cfg.seed is not None:
            keras.utils.set_random_seed(cfg.seed)  # reproducible initialization

        with self.strategy.scope():
            self.model = build_model(cfg, self.num_classes, self.domains)
            self.resolution = self.model.resolution
            schedule = make_schedule(
                cfg.lr_schedule, scaled_learning_rate(cfg.train_batch_size, cfg.base_learning_rate),
                self.steps_per_epoch, self.total_steps, cfg.warmup_epochs, cfg.lr_decay_epochs,
                cfg.lr_decay_rate,
            )
            self.schedule = schedule
            self.optimizer = make_optimizer(
                cfg.optimizer, schedule, self.model, skip_non_finite=cfg.on_nan == "skip",
                loss_scaling=cfg.mixed_precision == "float16",
            )
            self.ema = ExponentialMovingAverage(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
            step_config = StepConfig(
                global_batch_size=cfg.train_batch_size, num_classes=self.num_classes,
                label_smoothing=cfg.label_smoothing, weight_decay=cfg.weight_decay,
                attack=AttackConfig(cfg.epsilon, attack_steps(cfg), cfg.attack_step_size,
                                    cfg.targeted, cfg.random_start, cfg.attack_bn_mode),
                epsilon_schedule=tuple(parse_epsilon_schedule(cfg.epsilon_schedule)) if cfg.epsilon_schedule else None,
                fixed_num_steps=cfg.attack_steps is not None,
                total_steps=self.total_steps, clean_weight=cfg.clean_loss_weight,
                adv_weight=cfg.adv_loss_weight, seed=self.seed, jit_compile=cfg.jit_compile,
                skip_non_finite=cfg.on_nan == "skip",
            )
            self.train_step = TrainStep(self.model, get_method(cfg.method), self.optimizer,
                                        step_config, self.strategy, self.ema)
        self._skip_batches = 0
        self.train_iterator = self._make_iterator()
        tracked = dict(model=self.model, optimizer=self.optimizer, step=self.train_step.global_step,
                       skipped_images=self.decode_stats.skipped)
        if self.ema is not None:
            tracked["ema"] = self.ema
        # The iterator's position is saved when its pipeline is stateless (no
        # keras-cv RandAugment) and the strategy's iterator supports it (the
        # default strategy's does; Mirrored/TPU ones do not). Otherwise a
        # resume skips the consumed elements (see train_dataset).
        self.iterator_saved = (
            cfg.checkpoint_input_pipeline and "randaugment" not in (cfg.augment, *self.views)
            and isinstance(self.train_iterator, tf.__internal__.tracking.Trackable)
        )
        if self.iterator_saved:
            tracked["train_iterator"] = self.train_iterator
        self.checkpoint = tf.train.Checkpoint(**tracked)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(cfg.model_dir, "checkpoints"), max_to_keep=cfg.keep_checkpoints,
        )
        write_run_config(cfg.model_dir, self.model, self.source.class_names, cfg.method, cfg.dataset,
                         dict(data_dir=cfg.data_dir, num_classes=cfg.num_classes,
                              holdout_fraction=cfg.holdout_fraction,
                              synthetic_examples=cfg.synthetic_examples,
                              synthetic_size=int(math.ceil((cfg.resolution or 224) / 0.875))))
        self.writer = tf.summary.create_file_writer(os.path.join(cfg.model_dir, "train"))
        self.eval_writer = tf.summary.create_file_writer(os.path.join(cfg.model_dir, "eval"))

    # ------------------------------------------------------------------ input
    def _make_iterator(self):
        return iter(self.strategy.distribute_datasets_from_function(self._train_input))

    def _train_input(self, ctx):
        return train_dataset(
            self.source, self.resolution, ctx.get_per_replica_batch_size(self.cfg.train_batch_size),
            augment=self.cfg.augment, randaugment_layers=self.cfg.randaugment_layers,
            randaugment_magnitude=self.cfg.randaugment_magnitude, views=self.views,
            seed=self.seed, shuffle_buffer=self.cfg.shuffle_buffer, stats=self.decode_stats,
            skip_batches=self._skip_batches, crop_min_area=self.cfg.crop_min_area, input_context=ctx,
        )

    def _eval_input(self):
        """Global batches padded to full size, split evenly over the replicas."""
        replicas = self.strategy.num_replicas_in_sync
        batch = -(-self.cfg.eval_batch_size // replicas) * replicas
        ds = eval_dataset(self.source, self.resolution, batch, stats=self.decode_stats, pad_to_batch=True)
        return self.strategy.experimental_distribute_dataset(ds)

    # ---------------------------------------------------------------- restore
    def restore(self):
        """Resume from the newest checkpoint; returns the step restored (0 if none)."""
        latest = self.manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            step = self.train_step.current_step
            logging.info("resumed from %s at step %d", latest, step)
            if not self.iterator_saved and step:
                self._skip_batches = step
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
        step = self.train_step.current_step
        if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(f"-{step}"):
            return self.manager.latest_checkpoint
        return self.manager.save(checkpoint_number=step)

    # ------------------------------------------------------------------ train
    def run(self):
        """Train to total_steps; returns the final eval results (or None when interrupted)."""
        cfg = self.cfg
        step = self.restore()
        images_per_step = cfg.train_batch_size
        started, start_step = time.time(), step
        timing = _TrainTiming(cfg.model_dir, images_per_step, self.total_steps)
        with _Preemption() as preemption:
            while step < self.total_steps:
                n = min(cfg.steps_per_loop, self.total_steps - step)
                loop_start = time.time()
                try:
                    sums = self.train_step.run_loop(self.train_iterator, tf.constant(n))
                except tf.errors.OutOfRangeError:
                    raise SourceError(
                        f"the training data of {cfg.dataset!r} ran dry: no image could be decoded"
                    ) from None
                sums = {k: float(v) for k, v in sums.items()}
                step = self.train_step.current_step
                if sums["non_finite"] > 0 and cfg.on_nan == "stop":
                    raise NonFiniteLossError(
                        f"loss is not finite at step {step} (within the last {n} steps); stopped "
                        f"without saving. The last good checkpoint is {self.manager.latest_checkpoint}. "
                        "Lower --base_learning_rate, or pass --on_nan=skip to skip such steps."
                    )
                elapsed = time.time() - loop_start
                timing.add(n, elapsed, first=step - n == start_step)
                self._log(step, n, sums, images_per_step * n / elapsed,
                          (time.time() - started) / max(1, step - start_step) * (self.total_steps - step))
                if step % cfg.checkpoint_every_steps == 0 or step >= self.total_steps:
                    self.save()
                    timing.write(step)
                if cfg.eval_every_steps and step % cfg.eval_every_steps == 0 and step < self.total_steps:
                    self.evaluate()
                if preemption.requested:
                    path = self.save()
                    timing.write(step)
                    logging.warning("SIGTERM: saved %s at step %d; exiting", path, step)
                    return None
        self.save()
        timing.write(step)
        results = self.evaluate(final=True)
        if cfg.export:
            self.export_path = export(cfg.model_dir, os.path.join(cfg.model_dir, "export"),
                                      use_ema=self.ema is not None)
            logging.info("exported the main-BN inference model to %s", self.export_path)
        return results

    def _log(self, step, n, sums, images_per_second, eta_seconds):
        examples = max(sums["examples"], 1.0)
        lr = float(self.schedule(step))
        parts = [f"step {step}/{self.total_steps}", f"loss {sums['loss'] / n:.4f}"]
        scalars = {"loss": sums["loss"] / n, "learning_rate": lr, "images_per_second": images_per_second}
        for key in sorted(sums):
            if key.endswith("_correct"):
                name = key[: -len("_correct")]
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
        """Top-1/top-5 on the eval split with the EMA weights and the main BN."""
        if "validation" not in self.source.splits:
            logging.warning("no validation split in %s: skipping evaluation", self.cfg.dataset)
            return None
        domain = domain or self.model.main_domain
        if self.ema is not None:
            self.ema.swap()
        try:
            results = self._evaluate(domain)
        finally:
            if self.ema is not None:
                self.ema.swap()
        step = self.train_step.current_step
        results.update(step=step, domain=domain, ema=self.ema is not None)
        logging.info("eval at step %d (%s BN%s): top-1 %.4f top-5 %.4f on %d images", step, domain,
                     ", EMA" if self.ema is not None else "", results["top_1"], results["top_5"],
                     results["examples"])
        with self.eval_writer.as_default(step=step):
            tf.summary.scalar("top_1", results["top_1"])
            tf.summary.scalar("top_5", results["top_5"])
        if final:
            with open(os.path.join(self.cfg.model_dir, "eval_results.json"), "w") as f:
                json.dump(results, f, indent=2)
        return results

    def _evaluate(self, domain):
        model, k = self.model, min(5, self.num_classes)

        @tf.function
        def replica_counts(images, labels):
            return topk_counts(model(images, training=False, domain=domain), labels, k)

        totals = tf.zeros([3])
        for i, (images, labels) in enumerate(self._eval_input()):
            if self.cfg.eval_steps and i >= self.cfg.eval_steps:
                break
            per_replica = self.strategy.run(replica_counts, args=(images, labels))
            totals += self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        top1, topk, n = (float(v) for v in totals.numpy())
        return {"top_1": top1 / max(n, 1), "top_5": topk / max(n, 1), "examples": int(n)}


def run_training(cfg, strategy=None):
    """Train (or resume) as `cfg` says; returns the Trainer after the run."""
    trainer = Trainer(cfg, strategy)
    trainer.results = trainer.run()
    return trainer
