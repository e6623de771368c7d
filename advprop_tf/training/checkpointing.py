"""What a run's checkpoints hold and when one is written: restore the newest that restores, save once per step."""

from __future__ import annotations

import tensorflow as tf

from advprop_tf.models.base import WeightsByPath
from advprop_tf.training.run_dir import RunDir


class Checkpoints:
    """Every model weight by path (BN statistics of all domains included, which Keras 3 alone would not save),
    the optimizer, the EMA, the step counter, and whatever else the run adds (input position, image counts)."""

    def __init__(self, run_dir: RunDir, model, optimizer, step, ema=None, keep: int = 3, **more):
        objects = dict(model=model, model_weights=WeightsByPath(model), optimizer=optimizer, step=step, **more)
        if ema is not None:
            objects["ema"] = ema
        self.run_dir = run_dir
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(self.checkpoint, run_dir.checkpoint_dir, max_to_keep=keep)
        self._newest = None  # (step, path) of the newest checkpoint written or restored

    def restore(self, step_of) -> str | None:
        """Restore the newest checkpoint that restores (a damaged one is skipped); returns its path or None.
        `step_of()` reads the restored step."""
        path = self.run_dir.restore_newest(lambda p: self.checkpoint.restore(p).assert_existing_objects_matched())
        if path:
            self._newest = (step_of(), path)
        return path

    def save(self, step: int) -> str:
        """Checkpoint `step` unless it is the newest one already (every worker saves; non-chief ones in their
        private directory)."""
        if self._newest is not None and self._newest[0] == step:
            return self._newest[1]
        path = self.manager.save(checkpoint_number=step)
        self._newest = (step, path)
        return path
