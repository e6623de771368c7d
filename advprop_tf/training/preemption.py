"""Act on SIGTERM (a preemption, a scheduler's stop) within the grace period: stop after the current step.

Compute Engine gives a preempted VM 30 seconds. A Python signal handler runs
only when the main thread is back in Python, i.e. after the running graph loop
of `steps_per_loop` steps (200 for configs/b3.flags: possibly minutes). So the
signal's arrival is watched from a thread: Python's C-level handler writes the
signal number to a wakeup file descriptor at once, the watcher thread wakes
and sets the train step's stop flag, and the graph loop ends after the step
it is in. The trainer then saves a checkpoint and returns.

Several workers: the stop flag is agreed inside the graph loop (the sum of the
flags over all replicas, every step: step.py), so a SIGTERM to ANY worker stops
them all after the same step and every worker saves that step; none is left
waiting in a collective. The command then exits with the restart code (42,
train.py): a stopped run is not a finished one. (TensorFlow's PreemptionCheckpointHandler, used here before, saves
only after one more host loop once a worker is signalled -- its protocol agrees
on "run counter + 1" between host loops -- and on Google Cloud it ignores TPU
and CPU devices altogether.)
"""

from __future__ import annotations

import os
import signal
import threading

from absl import logging


class SigtermWatcher:
    """Calls `on_sigterm()` from a thread as soon as SIGTERM arrives, while the main thread runs TensorFlow.

    Only in the main thread (where Python allows signal handlers); elsewhere it
    does nothing. `close()` restores the previous handler and wakeup fd.
    """

    def __init__(self, on_sigterm):
        self.requested = False
        self._on_sigterm = on_sigterm
        self._installed = False
        if threading.current_thread() is not threading.main_thread():
            return
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_handler = signal.signal(signal.SIGTERM, self._handle)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._installed = True
        self._closing = False
        self._thread = threading.Thread(target=self._watch, name="sigterm-watcher", daemon=True)
        self._thread.start()

    def _handle(self, signum, frame):  # the Python-level handler, run later by the main thread
        del signum, frame
        self.requested = True

    def _watch(self):
        while True:
            data = os.read(self._read, 64)  # blocks without the GIL until a signal (or close) writes
            if self._closing or not data:
                return
            if signal.SIGTERM in data:
                self.requested = True
                logging.warning("SIGTERM: stopping after the current step")
                self._on_sigterm()

    def close(self):
        if not self._installed:
            return
        self._installed = False
        signal.set_wakeup_fd(self._previous_fd)
        signal.signal(signal.SIGTERM, self._previous_handler)
        self._closing = True
        os.write(self._write, b"\0")  # wake the thread so that it ends
        self._thread.join(timeout=5)
        os.close(self._read)
        os.close(self._write)
