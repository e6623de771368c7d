"""Interruptions and bad numbers: SIGKILL and SIGTERM mid-run, non-finite losses, damaged checkpoints,
corrupt images across a resume. (Split from test_training.py so that the two files run side by side.)"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.train import RESTART_EXIT_CODE
from advprop_tf.training.loop import NonFiniteLossError, Trainer, run_training
from tests.helpers import as_users_run_it, synthetic_batches
from tests.test_training import REPO, TINY, tiny_config, weights


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run_training(tiny_config(tmp_path, train_steps=3, export=False, method="vanilla"))
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(NonFiniteLossError, match="not finite.*--on_nan=skip"):
        run_training(tiny_config(tmp_path, train_steps=6, base_learning_rate=1e30, export=False,
                                 method="vanilla"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == checkpoints
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("-3")


def test_non_finite_steps_are_skipped_on_request(tmp_path):
    """--on_nan=skip: a NaN batch changes no weight, no BN statistic, no EMA; the run goes on."""
    trainer = Trainer(tiny_config(tmp_path, on_nan="skip", train_steps=4))
    x, y = next(iter(synthetic_batches(8)))
    trainer.train_step.run_batch(x, y)
    before = weights(trainer)
    ema_before = [s.numpy().copy() for s in trainer.ema.shadows]
    poisoned = tf.tensor_scatter_nd_update(x, [[0, 0, 0, 0]], [float("nan")])
    sums = trainer.train_step.run_batch(poisoned, y)
    assert float(sums["non_finite"]) == 1
    for a, b in zip(before, weights(trainer)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(ema_before, trainer.ema.shadows):
        np.testing.assert_array_equal(a, b.numpy())
    assert trainer.train_step.current_step == 2
    trainer.train_step.run_batch(x, y)  # training continues
    assert all(np.all(np.isfinite(w)) for w in weights(trainer))
    assert not all(np.array_equal(a, b) for a, b in zip(before, weights(trainer)))


def _train_cmd(model_dir, *extra):
    args = [f"--{k}={v}" for k, v in TINY.items() if k not in ("train_steps", "steps_per_loop", "checkpoint_every_steps")]
    return [sys.executable, "-m", "advprop_tf.train", f"--model_dir={model_dir}", *args, *extra]


def _wait_for_checkpoint(model_dir, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def test_sigkill_mid_run_then_restart_finishes_at_train_steps(tmp_path):
    model_dir = str(tmp_path)
    # vanilla: what is tested is the run's survival, not the method (a cheaper step to trace, twice)
    cmd = _train_cmd(model_dir, "--method=vanilla", "--train_steps=40", "--steps_per_loop=1",
                     "--checkpoint_every_steps=1", "--export=false")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for_checkpoint(model_dir, proc)
    time.sleep(0.7)  # kill at an arbitrary point, possibly while a checkpoint is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")).rsplit("-", 1)[1])
    assert 0 < killed_at < 40
    done = subprocess.run(_train_cmd(model_dir, "--method=vanilla", "--train_steps=40", "--steps_per_loop=20",
                                     "--checkpoint_every_steps=20", "--export=false"),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.load(open(tmp_path / "eval_results.json"))["step"] == 40
    assert tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")).endswith("-40")
    assert "resumed from" in done.stdout + done.stderr


def test_a_sigterm_stops_the_running_host_loop_and_the_rerun_ends_at_train_steps(tmp_path):
    """SIGTERM in the middle of one long host loop (--steps_per_loop=100, the whole run): the loop stops after the
    current step, the checkpoint is of that step (before the loop's end), the process exits with the restart code
    (not 0: a scheduler would take the run for finished) after a line naming that checkpoint, and the same
    command resumes from it and ends at --train_steps exactly, with 0."""
    model_dir = str(tmp_path)
    args = ["--train_steps=100", "--steps_per_loop=100", "--checkpoint_every_steps=100", "--export=false"]
    proc = subprocess.Popen(_train_cmd(model_dir, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=as_users_run_it())
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "training steps 0 to 100" in line or not line:
            break
    time.sleep(2)  # inside the graph loop (or its tracing): a signal handler alone would wait for its end
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    output = proc.communicate(timeout=600)[0]  # generous: two test files share the two cores
    seconds_to_exit = time.time() - signalled
    assert proc.returncode == RESTART_EXIT_CODE, output[-3000:]
    assert "SIGTERM: saved" in output and "stopping after the current step" in output
    saved = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    stopped_at = int(saved.rsplit("-", 1)[1])
    assert output.rstrip().splitlines()[-1] == (
        f"advprop_tf.train: stopped before --train_steps (SIGTERM at step {stopped_at} of 100). Rerunning the same "
        f"command resumes from {saved} in --model_dir={model_dir}; on several workers, restart every worker with "
        f"the same command. Exit {RESTART_EXIT_CODE}.")
    assert 1 <= stopped_at < 100, output[-3000:]
    print(f"SIGTERM acted on at step {stopped_at} of the 100-step host loop; exited {seconds_to_exit:.1f} s later")
    rerun = subprocess.run(_train_cmd(model_dir, *args), cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=as_users_run_it())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {stopped_at}" in rerun.stdout + rerun.stderr  # resumed from it
    assert tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")).endswith("-100")


def test_the_corrupt_image_count_survives_a_resume_and_does_not_grow_with_epochs(tmp_path):
    from tests.test_data import corrupt_folder

    images = corrupt_folder(tmp_path / "images")
    config = dict(dataset=f"folder:{images}", train_batch_size=2, steps_per_loop=3, checkpoint_every_steps=9,
                  export=False, method="vanilla")
    trained = run_training(tiny_config(tmp_path / "run", train_steps=9, **config))  # three passes
    assert int(trained.inputs.decode_stats.skipped.numpy()) == 2
    resumed = Trainer(tiny_config(tmp_path / "run", train_steps=12, **config))
    assert resumed.restore() == 9 and int(resumed.inputs.decode_stats.skipped.numpy()) == 2


def test_skipping_in_float32_never_shrinks_a_scale_so_later_steps_still_update():
    """--on_nan=skip in float32: 200 skipped steps, then finite ones still change the weights."""
    import keras

    from advprop_tf.training.optimization import NonFiniteSkippingOptimizer, make_optimizer

    weight = keras.Variable(np.ones(3, np.float32))
    optimizer = make_optimizer("sgd", 0.1, skip_non_finite=True)
    assert isinstance(optimizer, NonFiniteSkippingOptimizer)
    optimizer.build([weight])
    nan = tf.constant([np.nan, 0.0, 0.0])

    @tf.function
    def apply(grad):
        optimizer.apply_gradients([(grad, weight)])

    for _ in range(200):
        apply(nan)
    np.testing.assert_array_equal(weight.numpy(), np.ones(3))
    assert float(optimizer.dynamic_scale) == 1.0  # Keras' own LossScaleOptimizer would be at 2**-200 = 0
    apply(tf.constant([1.0, 1.0, 1.0]))
    # exactly what one step of a fresh optimizer gives: the 200 skips left no trace (momentum included)
    fresh = keras.Variable(np.ones(3, np.float32))
    make_optimizer("sgd", 0.1).apply_gradients([(tf.constant([1.0, 1.0, 1.0]), fresh)])
    assert weight.numpy()[0] < 0.95
    np.testing.assert_allclose(weight.numpy(), fresh.numpy(), rtol=1e-6)


def test_a_damaged_newest_checkpoint_falls_back_to_an_older_one_and_the_run_goes_on(tmp_path, caplog):
    from advprop_tf.training.run_dir import RunDirError

    run_training(tiny_config(tmp_path, train_steps=4, steps_per_loop=2, checkpoint_every_steps=2, export=False,
                             method="vanilla"))
    data = tmp_path / "checkpoints" / "ckpt-4.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # a partial copy, a full disk
    with caplog.at_level("WARNING"):
        trainer = Trainer(tiny_config(tmp_path, train_steps=6, steps_per_loop=2, checkpoint_every_steps=2,
                                      export=False, method="vanilla"))
        assert trainer.restore() == 2
    assert "skipping checkpoint" in caplog.text and "ckpt-4" in caplog.text
    trainer.results = trainer.run()
    assert trainer.train_step.current_step == 6 and trainer.run_dir.latest_checkpoint().endswith("ckpt-6")
    # none restores: one clear error, nothing trained
    for index in (tmp_path / "checkpoints").glob("ckpt-*.index"):
        index.write_bytes(b"damaged")
    with pytest.raises(RunDirError, match=r"^model_dir: none of the \d checkpoints .* restores"):
        Trainer(tiny_config(tmp_path, train_steps=8, export=False, method="vanilla")).restore()

