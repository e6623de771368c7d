"""The only owner of a run directory's files.

A run directory (--model_dir) may be a local path, gs://..., or any other
filesystem TensorFlow knows: every read and write here goes through
tf.io.gfile. Small files are written atomically (a temporary file, then a
rename), so an interruption leaves the old or the new file, never half of one.
Only the chief writes; other workers of a multi-worker run get a private
temporary directory for the checkpoints the strategy makes them write, which
`cleanup()` removes (as the tf.distribute guide prescribes).

Layout:
  run_config.json      what the run is (model config, method, data; the flags that fix its meaning)
  seed.txt             the run's seed, so a resume continues the same data order and attacks
  train_stats.json     training wall time and steady images/s, over all resumes
  eval_results.json    the final evaluation
  checkpoints/         tf.train.CheckpointManager's series
  train/ eval/         TensorBoard summaries
  export/<version>/    SavedModels (staged under export/.staging-<version> first)
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid

import tensorflow as tf
from absl import logging

from advprop_tf.errors import ConfigError
from advprop_tf.paths import basename, is_url, join

RUN_CONFIG = "run_config.json"
SEED = "seed.txt"
TRAIN_STATS = "train_stats.json"
EVAL_RESULTS = "eval_results.json"



class RunDirError(ConfigError):
    """A run directory that cannot be used as asked; `field` names the setting (model_dir, or a meaning
    field that differs on resume)."""


def write_atomically(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (never a half-written file)."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def write_json(path: str, value) -> None:
    write_atomically(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str, field: str = "model_dir"):
    """The JSON at `path`; RunDirError(field) naming the file when it is missing or not JSON."""
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.loads(f.read())
    except tf.errors.NotFoundError:
        raise RunDirError(field, f"{path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise RunDirError(field, f"{path!r} is not valid JSON ({e.msg} at line {e.lineno})") from None


def publish_directory(staging: str, target: str) -> None:
    """Make the finished directory `staging` appear as `target`.

    A local rename is atomic. Object stores (gs://) and the in-memory ram://
    have no directory rename (ram:// "renames" a directory without its files),
    so there the files are copied, the SavedModel's saved_model.pb last: a
    watcher such as TF Serving finds no loadable version before it is whole.
    """
    if not is_url(staging):
        tf.io.gfile.rename(staging, target)
        return
    files = []
    for directory, _, names in tf.io.gfile.walk(staging):
        files += [join(directory, name) for name in names]
    files.sort(key=lambda path: posixpath.basename(path) == "saved_model.pb")
    for source in files:
        destination = target + source[len(staging):]
        tf.io.gfile.makedirs(posixpath.dirname(destination))
        tf.io.gfile.copy(source, destination, overwrite=True)
    tf.io.gfile.rmtree(staging)


class RunDir:
    """Paths and files of one run directory, as seen by one worker."""

    def __init__(self, path: str, is_chief: bool = True, task_id: int = 0):
        if not path:
            raise RunDirError("model_dir", "is required")
        self.path = path.rstrip("/") or path
        if tf.io.gfile.exists(self.path) and not tf.io.gfile.isdir(self.path):
            raise RunDirError("model_dir", f"{self.path!r} is a file, not a directory")
        self.is_chief = is_chief
        self.task_id = task_id
        # Non-chief workers must still write the checkpoints a strategy asks
        # every worker to save; they go to a private directory, removed at the end.
        self._private = None if is_chief else join(self.path, f".workertemp_{task_id}")

    # ------------------------------------------------------------------ paths
    def file(self, name: str) -> str:
        return join(self.path, name)

    @property
    def checkpoint_dir(self) -> str:
        return join(self._private or self.path, "checkpoints")

    @property
    def chief_checkpoint_dir(self) -> str:
        """Where the run's checkpoint series is (what every worker restores from)."""
        return join(self.path, "checkpoints")

    @property
    def export_dir(self) -> str:
        return join(self.path, "export")

    def summary_writer(self, name: str):
        """TensorBoard writer for <model_dir>/<name>; a no-op writer on non-chief workers."""
        if not self.is_chief:
            return tf.summary.create_noop_writer()
        return tf.summary.create_file_writer(join(self.path, name))

    def latest_checkpoint(self):
        return tf.train.latest_checkpoint(self.chief_checkpoint_dir)

    def chief_checkpoint_of(self, saved: str) -> str:
        """The chief's prefix of a checkpoint this worker just saved (a non-chief saves into its private
        directory): what a restart resumes from, known without waiting for the chief's state file."""
        return join(self.chief_checkpoint_dir, basename(saved))

    def checkpoints_newest_first(self) -> list:
        """Every checkpoint prefix of the series (ckpt-<step>), the highest step first.

        Read from the files themselves, not only from the CheckpointManager's
        state file, so that a damaged newest checkpoint still leaves the others.
        """
        prefixes = [path[: -len(".index")] for path in tf.io.gfile.glob(join(self.chief_checkpoint_dir, "ckpt-*.index"))]
        steps = {prefix: prefix.rsplit("-", 1)[1] for prefix in prefixes}
        return sorted((p for p in prefixes if steps[p].isdigit()), key=lambda p: int(steps[p]), reverse=True)

    def restore_newest(self, restore) -> str | None:
        """Call `restore(prefix)` on the newest checkpoint that restores; returns its prefix (None: no checkpoint).

        A checkpoint that fails (a truncated file from a full disk or a partial
        copy) is skipped with a warning naming it and the reason, and the next
        older one is tried: the run loses steps, never itself. RunDirError
        when none restores.
        """
        failures = []
        for prefix in self.checkpoints_newest_first():
            try:
                restore(prefix)
            except (tf.errors.OpError, ValueError, IndexError, AssertionError) as e:
                reason = (getattr(e, "message", None) or str(e) or type(e).__name__).splitlines()[0]
                logging.warning("skipping checkpoint %s: it does not restore (%s)", prefix, reason)
                failures.append(f"{prefix}: {reason}")
                continue
            if failures:
                logging.warning("restored the older checkpoint %s instead", prefix)
            return prefix
        if failures:
            raise RunDirError("model_dir", f"none of the {len(failures)} checkpoints in {self.chief_checkpoint_dir!r} "
                              f"restores (newest: {failures[0]})")
        return None

    # ------------------------------------------------------------------ files
    def exists(self, name: str) -> bool:
        return tf.io.gfile.exists(self.file(name))

    def write_json(self, name: str, value) -> None:
        """Atomic, chief only (other workers' calls do nothing)."""
        if self.is_chief:
            tf.io.gfile.makedirs(self.path)
            write_json(self.file(name), value)

    def read_json(self, name: str):
        return read_json(self.file(name))

    def read_stats(self) -> dict:
        """train_stats.json, or {} (a damaged one is reported and replaced: it is only bookkeeping)."""
        if not self.exists(TRAIN_STATS):
            return {}
        try:
            return read_json(self.file(TRAIN_STATS))
        except RunDirError as e:
            logging.warning("ignoring %s; the training time counts restart from 0", e)
            return {}

    def seed(self, requested: int | None) -> int:
        """--seed, else the seed this run started with, else a new one (nothing written here)."""
        if requested is not None:
            return int(requested)
        if self.exists(SEED):
            with tf.io.gfile.GFile(self.file(SEED)) as f:
                text = f.read().strip()
            if text.isdigit():
                return int(text)
            logging.warning("%s holds %r, not a seed; starting a new one", self.file(SEED), text)
        return int(time.time_ns() % (2**31 - 1))

    def read_run_config(self) -> dict:
        if not self.exists(RUN_CONFIG):
            raise RunDirError("model_dir", f"{self.path!r} holds no {RUN_CONFIG}; is it a training directory?")
        return read_json(self.file(RUN_CONFIG))

    def check_resume(self, flags: dict, allow_change: bool = False) -> tuple:
        """Compare the meaning flags of a resumed run with those it was started with.

        Called before anything is built; only when a checkpoint exists (a run
        that never saved one starts afresh). RunDirError names the first
        flag that differs and both values, unless `allow_change`; returns the
        names of the flags that changed (with `allow_change`).
        """
        if not self.latest_checkpoint() or not self.exists(RUN_CONFIG):
            return ()
        stored = self.read_run_config().get("flags", {})
        changed = []
        for name in flags:
            if name not in stored:
                continue
            before, now = stored[name], flags[name]
            if _normalized(before) == _normalized(now):
                continue
            if allow_change:
                logging.warning("--%s changed from %r to %r on resume (--allow_config_change)", name, before, now)
                changed.append(name)
                continue
            raise RunDirError(name, f"{self.path!r} was started with {_show(before)}, not {_show(now)}; resuming "
                              "would change the run (pass --allow_config_change to resume with the new value anyway)")
        return tuple(changed)

    def record_start(self, run_config: dict, seed: int) -> None:
        """Write the run config and seed (chief only; called after the restore)."""
        self.write_json(RUN_CONFIG, run_config)
        if self.is_chief:
            write_atomically(self.file(SEED), f"{seed}\n")

    def cleanup(self) -> None:
        """Remove a non-chief worker's private directory."""
        if self._private and tf.io.gfile.exists(self._private):
            tf.io.gfile.rmtree(self._private)

    # ----------------------------------------------------------------- export
    @staticmethod
    def staging_dir(export_dir: str, version: int) -> str:
        return join(export_dir, f".staging-{version}")


def _normalized(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _show(value):
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "(none)"
    return "(default)" if value is None else str(value)


def make_run_config(model, class_names, method, dataset, data_options=None, flags=None) -> dict:
    """What export and evaluate need to rebuild the training model and find its data."""
    return {"model": model.get_config(), "class_names": list(class_names or []), "method": method,
            "dataset": dataset, "data_options": dict(data_options or {}), "flags": dict(flags or {})}


def checkpoint_reader(prefix: str):
    """A reader of the checkpoint `prefix` (…/ckpt-N) on any filesystem.

    tf.train.load_checkpoint first asks whether the prefix is a directory,
    which the in-memory ram:// filesystem answers yes for any prefix of a
    file name; the reader itself needs no such question.
    """
    return tf.compat.v1.train.NewCheckpointReader(prefix)
