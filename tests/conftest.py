"""Test set-up: quiet TensorFlow, two logical CPU devices for MirroredStrategy tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow's PreemptionCheckpointHandler asks the GCE metadata server whether
# it runs on Google Cloud. Tests (and the worker processes they start) ask a
# closed port on this machine instead: an immediate "no", and no traffic leaves.
os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Must happen before TensorFlow initializes its devices.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)
# Grappler's graph rewrites preserve results but cost seconds on every first call of a
# new graph (~40% of a tiny training run here), and the tests trace many graphs that
# each run a few steps. Command lines the tests start as processes keep them.
tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends with the float32 policy, whatever it changes."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")



@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny AdvProp run (4 steps, EMA, exported at the end), shared by the export and evaluate tests."""
    from advprop_tf.config import make_config
    from advprop_tf.training.loop import run_training

    model_dir = tmp_path_factory.mktemp("run")
    cfg = make_config(
        model_dir=str(model_dir), dataset="synthetic", synthetic_examples=128, width_coefficient=0.25,
        depth_coefficient=0.25, resolution=32, train_batch_size=8, eval_batch_size=32, train_steps=4,
        steps_per_loop=2, optimizer="sgd", lr_schedule="constant", base_learning_rate=0.5,
        warmup_epochs=0.0, seed=0, ema_decay=0.5, checkpoint_every_steps=4,
    )
    trainer = run_training(cfg)
    return model_dir, trainer
