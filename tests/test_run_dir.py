"""The run directory's owner: atomic files, chief-only writes, resume checks; checkpoint cadence."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.training.run_dir import RunDir, RunDirError, publish_directory
from tests.helpers import two_cpu_strategy
from tests.test_training import REPO, TINY, tiny_config


def test_json_is_written_atomically_and_only_by_the_chief(tmp_path):
    chief, worker = RunDir(str(tmp_path)), RunDir(str(tmp_path), is_chief=False, task_id=1)
    worker.write_json("train_stats.json", {"steps": 1})
    assert not os.path.exists(tmp_path / "train_stats.json")
    chief.write_json("train_stats.json", {"steps": 2})
    chief.write_json("train_stats.json", {"steps": 3})
    assert os.listdir(tmp_path) == ["train_stats.json"]  # no temporary file left behind
    assert chief.read_stats() == {"steps": 3}
    assert worker.checkpoint_dir == os.path.join(str(tmp_path), ".workertemp_1", "checkpoints")
    assert chief.checkpoint_dir == worker.chief_checkpoint_dir == os.path.join(str(tmp_path), "checkpoints")


def test_a_damaged_stats_file_does_not_stop_a_resume(tmp_path):
    (tmp_path / "train_stats.json").write_text('{"steps": 4, "train_sec')  # truncated by a crash
    assert RunDir(str(tmp_path)).read_stats() == {}
    (tmp_path / "run_config.json").write_text("{")
    with pytest.raises(RunDirError, match="^model_dir: .*run_config.json' is not valid JSON"):
        RunDir(str(tmp_path)).read_run_config()


def test_publish_directory_on_the_in_memory_filesystem():
    """ram:// (like gs://) has no directory rename: the files are copied, saved_model.pb last."""
    staging, target = "ram://publish/.staging-1", "ram://publish/1"
    for name, text in (("saved_model.pb", "pb"), ("variables/variables.index", "index"), ("assets/a.txt", "a")):
        tf.io.gfile.makedirs(os.path.dirname(f"{staging}/{name}"))
        with tf.io.gfile.GFile(f"{staging}/{name}", "w") as f:
            f.write(text)
    publish_directory(staging, target)
    assert not tf.io.gfile.exists(staging)
    assert tf.io.gfile.GFile(f"{target}/variables/variables.index").read() == "index"
    assert tf.io.gfile.GFile(f"{target}/saved_model.pb").read() == "pb"


def test_resume_with_a_changed_meaning_flag_is_refused_before_anything_is_written(tmp_path):
    from advprop_tf.training.loop import Trainer, run_training

    vanilla = dict(method="vanilla")  # the flags are the point here, not the method: a cheaper step

    run_training(tiny_config(tmp_path, train_steps=2, steps_per_loop=2, export=False, **vanilla))
    config_before = (tmp_path / "run_config.json").read_text()
    with pytest.raises(RunDirError, match=r"^train_batch_size: .* was started with 8, not 16; .*--allow_config_change"):
        Trainer(tiny_config(tmp_path, train_batch_size=16, train_steps=4, **vanilla))
    with pytest.raises(RunDirError, match=r"^aux_domains: .* was started with adv, not autoaugment,adv"):
        Trainer(tiny_config(tmp_path, aux_domains=["autoaugment", "adv"], train_steps=4, **vanilla))
    # the command line: exit 2 with one line naming the flag
    args = [f"--{k}={v}" for k, v in TINY.items()] + ["--method=vanilla"]
    again = subprocess.run([sys.executable, "-m", "advprop_tf.train", f"--model_dir={tmp_path}", *args,
                            "--train_steps=4", "--train_batch_size=16"], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith(
        f"advprop_tf.train: error: --train_batch_size: '{tmp_path}' was started with 8, not 16")
    assert (tmp_path / "run_config.json").read_text() == config_before
    # The stored record holds what is compared.
    assert json.loads(config_before)["flags"]["train_batch_size"] == 8
    # Explicitly allowed: the run goes on and the record follows the new value.
    run_training(tiny_config(tmp_path, train_batch_size=16, train_steps=3, steps_per_loop=1,
                             allow_config_change=True, export=False, **vanilla))
    assert RunDir(str(tmp_path)).read_run_config()["flags"]["train_batch_size"] == 16


def _checkpoint_steps(model_dir):
    return sorted(int(name[len("ckpt-"):-len(".index")]) for name in os.listdir(model_dir / "checkpoints")
                  if name.endswith(".index"))


def _summary_steps(directory, tag):
    steps = []
    for path in tf.io.gfile.glob(str(directory / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def test_checkpoints_and_evaluations_fall_on_exact_step_boundaries(tmp_path):
    """Loops end on the boundaries: steps_per_loop 4 does not hide checkpoint_every_steps 3."""
    from advprop_tf.training.loop import run_training

    run_training(tiny_config(tmp_path, train_steps=8, steps_per_loop=4, checkpoint_every_steps=3,
                             eval_every_steps=5, keep_checkpoints=10, eval_steps=1, export=False, method="vanilla"))
    assert _checkpoint_steps(tmp_path) == [3, 6, 8]
    assert _summary_steps(tmp_path / "eval", "top_1") == [5, 8]
    assert _summary_steps(tmp_path / "train", "loss") == [3, 5, 6, 8]


def test_resume_without_a_saved_iterator_skips_what_all_local_replicas_consumed(tmp_path):
    """Two replicas on one pipeline: after k steps the pipeline has made k x global batch examples."""
    from advprop_tf.training.loop import Trainer

    cfg = tiny_config(tmp_path, checkpoint_input_pipeline=False, augment="none")
    strategy = two_cpu_strategy()
    straight = Trainer(cfg, strategy)
    assert not straight.iterator_saved
    batches = [next(straight.train_iterator) for _ in range(3)]
    expected = [strategy.experimental_local_results(batches[2][1])]
    resumed = Trainer(cfg, strategy)
    resumed.train_iterator = resumed.inputs.train_iterator(resume_step=2)  # what restore() makes at step 2
    images, labels = next(resumed.train_iterator)
    got = [strategy.experimental_local_results(labels)]
    for a, b in zip(expected[0], got[0]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(strategy.experimental_local_results(batches[2][0]), strategy.experimental_local_results(images)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_bfloat16_run_exports_a_float32_saved_model(tmp_path):
    from tensorflow.core.protobuf import saved_model_pb2

    from advprop_tf.train import train_and_export
    from tests.test_export import training_model_logits

    trainer, export_path = train_and_export(tiny_config(tmp_path, train_steps=1, steps_per_loop=1,
                                                        mixed_precision="bfloat16", method="vanilla"))
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(tf.io.gfile.GFile(os.path.join(export_path, "saved_model.pb"), "rb").read())
    graph = proto.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for function in graph.library.function for n in function.node_def]
    dtypes = {t for n in nodes for a in n.attr.values() for t in [a.type, *a.list.type] if t}
    assert tf.float32.as_datatype_enum in dtypes and tf.bfloat16.as_datatype_enum not in dtypes
    loaded = tf.saved_model.load(export_path)
    pixels = tf.random.stateless_uniform([2, 32, 32, 3], [1, 2], 0, 255).numpy()
    # the reference reads the checkpoint itself (not through the export's loader): the EMA shadows, float32
    want = training_model_logits(tmp_path, pixels, "clean")
    np.testing.assert_allclose(loaded.signatures["predict_pixels"](pixels=pixels)["logits"].numpy(), want,
                               rtol=1e-5, atol=1e-5)
    # and the bfloat16 training network itself agrees to bfloat16 precision
    trainer.ema.swap()
    bf16 = trainer.model(pixels, training=False).numpy()
    trainer.ema.swap()
    assert np.abs(bf16 - want).max() < 0.1 * max(1.0, np.abs(want).max())
