"""Every path through tf.io.gfile: a whole run with data and model_dir on ram://, in one process.

TensorFlow's in-memory filesystem goes through the same gfile layer as gs://,
so code that passes here does not secretly need a local disk: a folder source
and TFRecord shards on ram://, train -> resume -> evaluate (CLI library) ->
export, every output read back from ram://.
"""

import json
import uuid

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from advprop_tf import train_flags
from advprop_tf.errors import ConfigError
from advprop_tf import evaluate as evaluate_cli
from advprop_tf.data.tfrecord_writer import write_tfrecords
from advprop_tf.train import train_and_export
from advprop_tf.training.loop import run_training
from advprop_tf.training.run_dir import RunDir
from tests.test_training import tiny_config

CLASSES = ("ants", "bees", "cats")


def write_image_folder(root, per_class=8, size=40):
    """JPEGs of three easily told apart colours, written through gfile."""
    for label, name in enumerate(CLASSES):
        tf.io.gfile.makedirs(f"{root}/{name}")
        for i in range(per_class):
            colour = np.zeros([size, size, 3], np.uint8)
            colour[..., label] = 200
            noise = np.random.default_rng(label * 100 + i).integers(0, 50, [size, size, 3], dtype=np.uint8)
            jpeg = tf.io.encode_jpeg(colour + noise).numpy()
            with tf.io.gfile.GFile(f"{root}/{name}/{i:03d}.jpg", "wb") as f:
                f.write(jpeg)


def test_train_resume_evaluate_export_on_ram_filesystem():
    root = f"ram://cloud-{uuid.uuid4().hex[:8]}"
    images, shards, model_dir = f"{root}/images", f"{root}/tfrecords", f"{root}/run"
    write_image_folder(images)
    report = write_tfrecords(images, shards, train_shards=2, validation_shards=1, holdout_fraction=0.25)
    assert report.written["train"] + report.written["validation"] == 24
    assert all(tf.io.gfile.exists(path) for paths in report.files.values() for path in paths)

    # The flag validation accepts locations it can only see through gfile.
    def validate(*args):
        fv = flags.FlagValues()
        train_flags.define_train_flags(fv)
        fv(["train", f"--model_dir={model_dir}", *args])
        train_flags.config_from_flags(fv)

    validate(f"--dataset=folder:{images}")
    validate("--dataset=tfrecord", f"--data_dir={shards}")
    with pytest.raises(ConfigError, match=f"^dataset: '{root}/nothing' does not exist"):
        validate(f"--dataset=folder:{root}/nothing")

    overrides = dict(dataset=f"folder:{images}", holdout_fraction=0.25, train_batch_size=6,
                     eval_batch_size=8, checkpoint_every_steps=2, keep_checkpoints=5,
                     method="vanilla")  # every path through gfile, whatever the method: the cheaper step
    first = run_training(tiny_config(model_dir, train_steps=2, steps_per_loop=2, export=False, **overrides))
    assert first.train_step.current_step == 2
    resumed, _ = train_and_export(tiny_config(model_dir, train_steps=4, steps_per_loop=2, **overrides))
    assert resumed.train_step.current_step == 4

    run = RunDir(model_dir)
    assert run.latest_checkpoint() == f"{model_dir}/checkpoints/ckpt-4"
    results = run.read_json("eval_results.json")
    assert results["step"] == 4 and results["examples"] == report.written["validation"]
    assert run.read_stats()["finished"] is True
    assert run.read_run_config()["class_names"] == list(CLASSES)
    assert tf.io.gfile.glob(f"{model_dir}/train/events.*") and tf.io.gfile.glob(f"{model_dir}/eval/events.*")
    assert sorted(tf.io.gfile.listdir(f"{model_dir}/export")) == ["1"]

    # The exported SavedModel loads from ram:// and serves JPEG bytes.
    loaded = tf.saved_model.load(f"{model_dir}/export/1")
    jpeg = tf.io.gfile.GFile(f"{images}/bees/000.jpg", "rb").read()
    served = loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg]))
    assert served["probabilities"].shape == (1, 3)
    labels = tf.io.gfile.GFile(f"{model_dir}/export/1/assets/labels.txt").read().split()
    assert labels == list(CLASSES)

    # The evaluate CLI's library on the TFRecord copy of the same images; its JSON goes to ram:// too.
    fv = flags.FlagValues()
    evaluate_cli.define_flags(fv)
    fv(["evaluate", f"--model_dir={model_dir}", f"--dataset=tfrecord:{shards}", "--num_classes=3",
        "--batch_size=8", "--attack=pgd", "--epsilon=2", f"--output={root}/evaluation.json"])
    evaluated, output = evaluate_cli.run(fv, log=lambda line: None)
    assert output == f"{root}/evaluation.json"
    assert json.loads(tf.io.gfile.GFile(output).read())["examples"] == report.written["validation"]
    # Same network, same held-out images (folder and TFRecords hold out the same files).
    assert evaluated["clean"]["top_1"] == results["top_1"]
    tf.io.gfile.rmtree(root)
