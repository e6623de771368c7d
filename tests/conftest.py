"""Test set-up: quiet TensorFlow, two logical CPU devices for MirroredStrategy tests."""

import os
import sys

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
    from advprop_tf.train import train_and_export
    from advprop_tf.train_flags import make_config

    model_dir = tmp_path_factory.mktemp("run")
    cfg = make_config(
        model_dir=str(model_dir), dataset="synthetic", synthetic_examples=128, width_coefficient=0.25,
        depth_coefficient=0.25, resolution=32, train_batch_size=8, eval_batch_size=32, train_steps=4,
        steps_per_loop=2, optimizer="sgd", lr_schedule="constant", base_learning_rate=0.5,
        warmup_epochs=0.0, seed=0, ema_decay=0.5, checkpoint_every_steps=4,
    )
    trainer, export_path = train_and_export(cfg)
    trainer.export_path = export_path
    return model_dir, trainer


# --- One Python process per test file -------------------------------------------------
# TensorFlow never gives back what a process compiled (XLA executables, traced graphs):
# one process for the whole suite grew past 20 GB. Each file runs in its own process,
# two at a time (the machines we test on have two cores and a test uses about one).
_CHILD_ENV = "ADVPROP_TEST_CHILD"
# Longest first, so that two processes finish together.
_LONGEST_FILES = ("test_xla.py", "test_keras.py", "test_multi_worker.py", "test_training.py",
                  "test_compare_methods.py", "test_fast_advprop.py", "test_checkpoints.py")


def _file_order(path):
    name = os.path.basename(path)
    return _LONGEST_FILES.index(name) if name in _LONGEST_FILES else len(_LONGEST_FILES)


def pytest_runtestloop(session):
    if os.environ.get(_CHILD_ENV) or session.config.option.collectonly:
        return None
    by_file = {}
    for item in session.items:
        by_file.setdefault(item.nodeid.split("::")[0], []).append(item.nodeid)
    if len(by_file) < 2:
        return None
    import subprocess
    import tempfile
    import time

    parallel = int(os.environ.get("ADVPROP_TEST_PROCESSES", "2"))
    waiting = sorted(by_file, key=_file_order)
    running, failed = {}, []
    env = dict(os.environ, **{_CHILD_ENV: "1"})
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    while waiting or running:
        while waiting and len(running) < parallel:
            path = waiting.pop(0)
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *by_file[path]]
            log = tempfile.TemporaryFile("w+")  # a pipe would block a child that prints much
            process = subprocess.Popen(command, cwd=session.config.rootpath, env=env, text=True,
                                       stdout=log, stderr=subprocess.STDOUT)
            running[path] = (process, log, time.monotonic())
        for path, (process, log, started) in list(running.items()):
            if process.poll() is None:
                continue
            log.seek(0)
            output = log.read()
            log.close()
            del running[path]
            summary = output.strip().splitlines()[-1] if output.strip() else "no output"
            reporter.write_line(f"{path}: {summary} ({time.monotonic() - started:.0f} s in its process)")
            if process.returncode != 0:
                failed.append(path)
                reporter.write_line(output)
        time.sleep(0.2)
    session.testsfailed = len(failed)
    reporter.write_line(f"{len(by_file)} test files, each in its own process: {len(failed)} failed "
                        "(pytest's own summary below counts none: the tests ran in those processes)")
    if failed:
        reporter.write_line("failed files: " + " ".join(failed))
    return True
