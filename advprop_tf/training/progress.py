"""What a run tells: console lines (step, loss, accuracies, lr, images/s, ETA), TensorBoard, train_stats.json."""

from __future__ import annotations

import time

import tensorflow as tf
from absl import logging

from advprop_tf.training.run_dir import TRAIN_STATS, RunDir


def format_eta(seconds) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Logs each host loop and keeps the training time and steady images/s over resumes (train_stats.json)."""

    def __init__(self, run_dir: RunDir, schedule, images_per_step: int, total_steps: int, skipped_images):
        self.run_dir = run_dir
        self.schedule = schedule
        self.images_per_step = images_per_step
        self.total_steps = total_steps
        self.skipped_images = skipped_images  # the input pipeline's counter variable
        self.writer = run_dir.summary_writer("train")
        self.eval_writer = run_dir.summary_writer("eval")
        previous = run_dir.read_stats()
        self.seconds = previous.get("train_seconds", 0.0)
        self.steady_steps = previous.get("steady_steps", 0)
        self.steady_seconds = previous.get("steady_seconds", 0.0)
        self._started = self._start_step = None

    def start(self, step: int):
        self._started, self._start_step = time.time(), step

    def host_loop(self, step: int, steps: int, seconds: float, sums: dict):
        """A host loop of `steps` steps that ended at `step` took `seconds`; its metric sums."""
        self.seconds += seconds
        if step - steps != self._start_step:  # the first loop of a process includes tracing
            self.steady_steps += steps
            self.steady_seconds += seconds
        done = max(1, step - self._start_step)
        eta = (time.time() - self._started) / done * (self.total_steps - step)
        lr = float(self.schedule(step))
        rate = self.images_per_step * steps / seconds
        parts = [f"step {step}/{self.total_steps}", f"loss {sums['loss'] / steps:.4f}"]
        scalars = {"loss": sums["loss"] / steps, "learning_rate": lr, "images_per_second": rate}
        for key in sorted(sums):
            if key.endswith("_correct"):
                name = key[: -len("_correct")]
                # a method that trains on parts of the batch (Fast AdvProp) counts each part's examples
                examples = max(sums.get(f"{name}_examples", sums["examples"]), 1.0)
                scalars[f"{name}/accuracy"] = sums[key] / examples
                scalars[f"{name}/loss"] = sums[f"{name}_loss"] / examples
                parts.append(f"{name} acc {sums[key] / examples:.3f}")
        skipped = int(self.skipped_images.numpy())
        parts += [f"lr {lr:.5f}", f"{rate:.1f} img/s", f"ETA {format_eta(eta)}"]
        if skipped:
            parts.append(f"skipped {skipped} corrupt images")
        logging.info(" | ".join(parts))
        with self.writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
            tf.summary.scalar("skipped_images", skipped)

    def evaluation(self, step: int, results: dict):
        with self.eval_writer.as_default(step=step):
            tf.summary.scalar("top_1", results["top_1"])
            tf.summary.scalar("top_5", results["top_5"])

    def write_stats(self, step: int):
        rate = self.steady_steps * self.images_per_step / self.steady_seconds if self.steady_seconds else None
        self.run_dir.write_json(TRAIN_STATS, {
            "steps": step, "total_steps": self.total_steps, "finished": step >= self.total_steps,
            "train_seconds": round(self.seconds, 1), "steady_steps": self.steady_steps,
            "steady_seconds": round(self.steady_seconds, 2), "images_per_second": rate})
