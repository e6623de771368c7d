"""Stop training cleanly on SIGTERM (preemption, a scheduler's stop): save a checkpoint, then return.

Several workers (MultiWorkerMirroredStrategy): TensorFlow's own
`tf.distribute.experimental.PreemptionCheckpointHandler`. A SIGTERM to ANY
worker is shared through the coordination service; every worker then saves
after the same step and stops, so no worker is left waiting in a collective.

One process (CPU, GPUs, a TPU VM): the handler would not help. On Google
Cloud VMs TensorFlow's handler deliberately does nothing for TPU and CPU
devices, and a single process needs no agreement. There a SIGTERM sets a
flag that the loop reads after each host loop, as before.
"""

from __future__ import annotations

import signal

import tensorflow as tf
from absl import logging

from advprop_tf.training.strategy import multi_worker_resolver


class Preempted(Exception):
    """Raised by the handler's exit function, after the checkpoint was saved."""


class _SignalFlag:
    """SIGTERM -> a flag; the previous handler comes back on close()."""

    def __init__(self):
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class PreemptionWatcher:
    """`should_stop()` after each host loop: True once a checkpoint was saved because of a SIGTERM.

    `save` is the trainer's save function (chief: the run's series; other
    workers: their private directory); `manager` the CheckpointManager the
    handler restores from on creation (the checkpoint the trainer restored).
    """

    def __init__(self, strategy, manager, save):
        self._save = save
        self._handler = None
        self._flag = None
        resolver = multi_worker_resolver(strategy)
        if resolver is not None:
            config = tf.distribute.experimental.TerminationConfig(exit_fn=self._exit, save_fn=self._save_once)
            self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
                resolver, manager, termination_config=config)
            logging.info("preemption: tf.distribute.experimental.PreemptionCheckpointHandler")
        else:
            self._flag = _SignalFlag()
        self.saved_path = None

    def _save_once(self, *args, **kwargs):
        del args, kwargs
        self.saved_path = self._save()

    @staticmethod
    def _exit():
        raise Preempted()

    def should_stop(self) -> bool:
        if self._handler is not None:
            try:
                self._handler.save_checkpoint_if_preempted()
            except Preempted:
                return True
            return False
        if self._flag.requested:
            self.saved_path = self._save()
            return True
        return False

    def close(self):
        if self._flag is not None:
            self._flag.close()
