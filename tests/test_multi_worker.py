"""MultiWorkerMirroredStrategy for real: two worker processes on 127.0.0.1, host loops of 25 steps.

Phase 1 trains until a SIGTERM to ONE worker (the non-chief) in the middle of a host loop: the stop flag,
agreed by both inside the graph loop, makes both stop after the same step, save it and exit with the restart
code (42). Phase 2 restarts both and SIGKILLs the non-chief: the chief exits 42 with one line naming the
checkpoint a restart resumes from, no traceback. Phase 3 restarts both with --jit_compile (XLA under
MultiWorkerMirroredStrategy): they resume at that exact step, train on, evaluate, export and exit 0. The run
directory must hold ONE set of run files, one checkpoint series and one export, and no worker's private
directory.

The network is a reduced ResNet-50 (5 bottleneck blocks): the loop is the subject here, and a 3-step
--jit_compile run of it takes 29 s alone against 46 s for the reduced EfficientNet-B0. EfficientNet's whole
step is lowered to XLA in tests/test_xla.py.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from advprop_tf.train import RESTART_EXIT_CODE as RESTART
from advprop_tf.training.run_dir import RunDir
from tests.helpers import as_users_run_it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--model=resnet-50", "--dataset=synthetic", "--synthetic_examples=64", "--width_coefficient=0.25",
    "--depth_coefficient=0.25", "--resolution=32", "--train_batch_size=8", "--eval_batch_size=16",
    "--steps_per_loop=25", "--optimizer=sgd", "--lr_schedule=constant", "--base_learning_rate=0.1",
    "--warmup_epochs=0", "--seed=5", "--ema_decay=0.9", "--shuffle_buffer=16", "--epsilon=1",
    "--checkpoint_every_steps=25", "--keep_checkpoints=10",
]


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


_LAUNCHED = []


@pytest.fixture(autouse=True)
def _no_worker_outlives_the_test():
    """A failed assertion must not leave workers training "forever" on the machine."""
    yield
    for proc in _LAUNCHED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _LAUNCHED.clear()


def launch(model_dir, hosts, extra, logs):
    env = as_users_run_it(TF_CPP_MIN_LOG_LEVEL="2")  # Grappler on
    env.pop("TF_CONFIG", None)
    procs = []
    for index in range(2):
        log = open(logs / f"worker{index}-{len(list(logs.iterdir()))}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "advprop_tf.train", f"--model_dir={model_dir}", f"--worker_hosts={hosts}",
             f"--task_index={index}", *TINY, *extra],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
        procs[-1].log_path = log.name
    _LAUNCHED.extend(procs)
    return procs


def finish(procs, timeout):
    outputs = []
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a worker did not finish in time:\n" + open(proc.log_path).read()[-3000:])
        outputs.append(open(proc.log_path).read())
    return outputs


def fingerprint(output, pattern):
    found = re.findall(pattern, output)
    assert found, output[-3000:]
    return found[-1]


def test_two_workers_preempt_resume_evaluate_export(tmp_path):
    model_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    hosts = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))

    # -- phase 1: train "forever"; SIGTERM the non-chief once the first host loop's checkpoint exists, in the next
    procs = launch(model_dir, hosts, ["--train_steps=100000", "--export=false"], logs)
    deadline = time.time() + 600  # generous: the suite runs two test files at a time on two cores
    while not RunDir(str(model_dir)).latest_checkpoint():
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            "\n".join(open(p.log_path).read()[-2000:] for p in procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = finish(procs, 400)
    assert [p.returncode for p in procs] == [RESTART, RESTART], outputs
    saved = [fingerprint(o, r"SIGTERM(?: to another worker)?: saved (\S+) at step (\d+); exiting "
                            r"\(weights fingerprint (\w+)\)") for o in outputs]
    (chief_path, chief_step, chief_weights), (_, worker_step, worker_weights) = saved
    assert chief_step == worker_step, "the workers saved after different steps"
    assert chief_weights == worker_weights, "the workers' weights differ"
    stopped_at = int(chief_step)
    assert RunDir(str(model_dir)).latest_checkpoint() == chief_path
    assert chief_path.endswith(f"ckpt-{stopped_at}") and 25 < stopped_at < 50, "not in the middle of a host loop"
    for output in outputs:
        assert f"resumes from {chief_path}" in output and "restart every worker with the same command" in output

    # -- phase 2: restart both, then SIGKILL the non-chief: the chief stops with the restart code and one line
    procs = launch(model_dir, hosts, ["--train_steps=100000", "--export=false"], logs)
    while not all(re.search(rf"resumed from \S+ at step {stopped_at}\b", open(p.log_path).read()) for p in procs):
        assert time.time() < deadline + 600 and all(p.poll() is None for p in procs), \
            "\n".join(open(p.log_path).read()[-2000:] for p in procs)
        time.sleep(0.2)
    time.sleep(2)
    procs[1].kill()
    chief = finish(procs[:1], 300)[0]
    assert procs[0].returncode == RESTART, chief[-3000:]
    assert "Traceback" not in chief and "stopped before --train_steps (another worker stopped answering" in chief
    resume_from = RunDir(str(model_dir)).latest_checkpoint()
    assert f"resumes from {resume_from}" in chief
    stopped_at = int(resume_from.rsplit("-", 1)[1])

    # -- phase 3: restart both; they resume at the exact step, finish, evaluate, export
    # with XLA: under MultiWorkerMirroredStrategy each worker compiles its replica's compute part
    procs = launch(model_dir, hosts, [f"--train_steps={stopped_at + 3}", "--jit_compile"], logs)
    outputs = finish(procs, 600)
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]
    for output in outputs:
        assert re.search(rf"resumed from \S+ at step {stopped_at}\b", output), output[-3000:]
    end = [fingerprint(o, rf"trained to step {stopped_at + 3} \(weights fingerprint (\w+)\)") for o in outputs]
    assert end[0] == end[1], "the workers' weights differ at the end"

    run = RunDir(str(model_dir))
    results = run.read_json("eval_results.json")
    assert results["step"] == stopped_at + 3
    assert results["examples"] == 200  # the whole synthetic validation split (20 per class), each image once
    # one set of run files, one checkpoint series, one export, no worker directory left
    assert sorted(os.listdir(model_dir)) == sorted(
        ["checkpoints", "eval", "eval_results.json", "export", "run_config.json", "seed.txt", "train",
         "train_stats.json"])
    assert os.listdir(model_dir / "export") == ["1"]
    steps = sorted(int(name.split("-")[1].split(".")[0]) for name in os.listdir(model_dir / "checkpoints")
                   if name.startswith("ckpt-") and name.endswith(".index"))
    assert steps[-1] == stopped_at + 3 and stopped_at in steps
    assert len(steps) == len(set(steps))
    loaded = tf.saved_model.load(str(model_dir / "export" / "1"))
    assert loaded.signatures["predict_pixels"](pixels=tf.zeros([1, 32, 32, 3]))["probabilities"].shape == (1, 10)
