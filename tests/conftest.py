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

from tests.helpers import STARTED_PROCESSES_SITE  # noqa: E402

# Must happen before TensorFlow initializes its devices.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)
# Grappler's graph rewrites preserve results but cost seconds on every first call of a
# new graph (~40% of a tiny training run here), and the tests trace many graphs that
# each run a few steps. The processes the tests start turn them off too (a sitecustomize
# on their PYTHONPATH), except the README's command (test_readme.py), run as a user runs it.
tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
if STARTED_PROCESSES_SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [STARTED_PROCESSES_SITE, os.environ.get("PYTHONPATH")]))


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
# Each child writes its test reports to a file; this process replays them through
# pytest's own hooks, so its summary, exit status and --durations count every test.
_REPORTS_ENV = "ADVPROP_TEST_REPORTS"  # set in a child only: where it writes its reports
# Longest first, so that two processes finish together.
_LONGEST_FILES = ("test_xla.py", "test_training.py", "test_compare_methods.py", "test_interruptions.py",
                  "test_multi_worker.py", "test_tpu_compile.py",
                  "test_efficientnet.py", "test_keras.py", "test_export.py", "test_run_dir.py")
# Light files share a process (a process costs ~8 s of imports): those of a few seconds each, and those
# of tiny models or of one command line each.
_SHARED_PROCESSES = {
    "quick files": ("test_config.py", "test_layout.py", "test_augment.py", "test_imagenet_c.py", "test_multi_bn.py"),
    "light files": ("test_runner.py", "test_pgd.py", "test_new_method.py"),
}
_SHARED_BY_FILE = {name: group for group, names in _SHARED_PROCESSES.items() for name in names}
_config = None
_exit_status = None  # the session's, once it has finished


def pytest_configure(config):
    global _config
    _config = config


def pytest_runtest_logreport(report):
    """In a child: append the report, as pytest serializes it, to the parent's file."""
    path = os.environ.get(_REPORTS_ENV)
    if path:
        import json

        data = _config.hook.pytest_report_to_serializable(config=_config, report=report)
        with open(path, "a") as f:
            f.write(json.dumps(data) + "\n")


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config):
    """In a child: end the process once its summary is printed. pytest's unconfigure and Python's own shutdown
    collect every object the tests left, and freeing many traced TensorFlow functions took 7-40 s a process
    (the parent has every report already; its own shutdown stays as it is)."""
    if os.environ.get(_REPORTS_ENV) and _exit_status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


def _file_order(path):
    name = os.path.basename(path)
    return _LONGEST_FILES.index(name) if name in _LONGEST_FILES else len(_LONGEST_FILES)


def _replay(session, items, reports_path, output, returncode):
    """Feeds a child's reports to this session; tests it never reported fail with its output."""
    import json

    from _pytest.reports import TestReport

    hook = session.config.hook
    seen = set()
    if os.path.exists(reports_path):
        with open(reports_path) as f:
            for line in f:
                report = hook.pytest_report_from_serializable(config=session.config, data=json.loads(line))
                if report.when == "setup":
                    hook.pytest_runtest_logstart(nodeid=report.nodeid, location=report.location)
                hook.pytest_runtest_logreport(report=report)
                if report.when == "teardown":
                    hook.pytest_runtest_logfinish(nodeid=report.nodeid, location=report.location)
                    seen.add(report.nodeid)
    for item in items:
        if item.nodeid in seen:
            continue
        reason = (f"its test process exited with status {returncode} before reporting this test;"
                  f" the process printed:\n{output[-20000:]}")
        report = TestReport(item.nodeid, item.location, {}, "failed", reason, "call")
        hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        hook.pytest_runtest_logreport(report=report)
        hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def pytest_runtestloop(session):
    if os.environ.get(_REPORTS_ENV) or session.config.option.collectonly:
        return None
    by_file = {}  # a file, or a shared group of files: what one process runs
    for item in session.items:
        path = item.nodeid.split("::")[0]
        by_file.setdefault(_SHARED_BY_FILE.get(os.path.basename(path), path), []).append(item)
    if len(by_file) < 2:
        return None
    import subprocess
    import tempfile
    import time

    parallel = int(os.environ.get("ADVPROP_TEST_PROCESSES", "2"))
    waiting = sorted(by_file, key=_file_order)
    running = {}
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    scratch = tempfile.TemporaryDirectory(prefix="advprop-test-reports-")
    while waiting or running:
        while waiting and len(running) < parallel:
            path = waiting.pop(0)
            reports_path = os.path.join(scratch.name, f"{len(by_file) - len(waiting)}.jsonl")
            env = dict(os.environ, **{_REPORTS_ENV: reports_path})
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       *[item.nodeid for item in by_file[path]]]
            log = tempfile.TemporaryFile("w+")  # a pipe would block a child that prints much
            process = subprocess.Popen(command, cwd=session.config.rootpath, env=env, text=True,
                                       stdout=log, stderr=subprocess.STDOUT)
            running[path] = (process, log, reports_path, time.monotonic())
        for path, (process, log, reports_path, started) in list(running.items()):
            if process.poll() is None:
                continue
            log.seek(0)
            output = log.read()
            log.close()
            del running[path]
            summary = output.strip().splitlines()[-1] if output.strip() else "no output"
            reporter.write_line(f"{path}: {summary} ({time.monotonic() - started:.0f} s in its process)")
            _replay(session, by_file[path], reports_path, output, process.returncode)
            if process.returncode not in (0, 1):  # interrupted, internal or usage error: not a test's failure
                reporter.write_line(output[-20000:])
                session.testsfailed += 1
        time.sleep(0.2)
    scratch.cleanup()
    return True
