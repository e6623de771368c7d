"""A trained run, loaded back: the network of its newest checkpoint that restores, EMA values applied.

Below training's loop and serving alike: evaluation, export, --init_checkpoint
and the checkpoint converter all load runs through here.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import keras
import tensorflow as tf

from advprop_tf.errors import ConfigError
from advprop_tf.models.base import MultiDomainNetwork, WeightsByPath
from advprop_tf.models.registry import model_from_config
from advprop_tf.training.ema import ExponentialMovingAverage
from advprop_tf.training.run_dir import RunDir, RunDirError, checkpoint_reader


@contextlib.contextmanager
def float32_policy():
    """Build layers in float32 whatever the training's mixed-precision policy."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


class Trained(NamedTuple):
    model: MultiDomainNetwork
    run: dict  # run_config.json
    step: int
    ema: bool  # whether the EMA averages were applied


def load_trained(model_dir, use_ema=None, domain=None) -> Trained:
    """The training model (all domains, float32) of `model_dir`'s newest checkpoint that restores.

    use_ema: True, False, or None for "the EMA when the run kept one" (the
    authors' ResNet recipe has none). ConfigError naming the field (model_dir,
    use_ema, domain) on a bad directory, no checkpoint or EMA, an unknown domain.
    """
    run_dir = RunDir(model_dir)
    run = run_dir.read_run_config()
    if not run_dir.checkpoints_newest_first():
        raise RunDirError("model_dir", f"no checkpoint in {run_dir.chief_checkpoint_dir!r}")
    try:
        with float32_policy():
            trained = model_from_config(run["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise RunDirError("model_dir", f"{run_dir.file('run_config.json')!r} does not describe a model ({e!r})") from None
    if domain is not None and domain not in trained.domains:
        raise ConfigError("domain", f"unknown domain {domain!r}; the model has {', '.join(trained.domains)}")
    found = {}

    def read(prefix):
        found.pop("ema", None)
        tracked = {"model": trained, "model_weights": WeightsByPath(trained)}
        if any(name.startswith("ema/") for name in checkpoint_reader(prefix).get_variable_to_shape_map()):
            tracked["ema"] = found["ema"] = ExponentialMovingAverage(trained)
        tf.train.Checkpoint(**tracked).read(prefix).expect_partial().assert_existing_objects_matched()

    latest = run_dir.restore_newest(read)
    if use_ema is None:
        use_ema = "ema" in found
    if use_ema:
        if "ema" not in found:
            raise ConfigError("use_ema", "the checkpoint holds no EMA (trained with --ema_decay=0); pass --use_ema=false")
        found["ema"].copy_to(trained)
    return Trained(trained, run, int(latest.rsplit("-", 1)[1]), bool(use_ema))
