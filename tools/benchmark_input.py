"""Images/s of the training input pipeline vs what a B0 AdvProp step consumes, in one run.

Reads an image folder (default ../shared/data/imagenette-train) and TFRecords
made from it (written once to --tfrecord_dir with the authors' format), at
224 px: decode + crop + flip, then with RandAugment (keras-cv) and AutoAugment
v0. The AdvProp step is B0 at 224 px, PGD-1, on this machine's CPU; the
target is input >= 5x the step's consumption without augmentation.

  python tools/benchmark_input.py [--data=<folder>] [--batches=30] [--json]

The pipeline and the model are timed one after the other, never at once, so
each has the whole machine (in training they share it: see the ratio).
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402

flags.DEFINE_string("data", os.path.join(REPO, "..", "shared", "data", "imagenette-train"), "Image folder.")
flags.DEFINE_string("tfrecord_dir", "/tmp/advprop_tf_benchmark_tfrecords", "TFRecords of --data (made if absent).")
flags.DEFINE_integer("resolution", 224, "Training resolution.")
flags.DEFINE_integer("batch_size", 64, "Pipeline batch.")
flags.DEFINE_integer("batches", 30, "Timed batches per configuration (after 5 warm-up batches).")
flags.DEFINE_integer("model_batch_size", 32, "Clean images per AdvProp step.")
flags.DEFINE_bool("json", False, "Print a JSON line last.")
FLAGS = flags.FLAGS


def pipeline_rate(source, augment):
    from advprop_tf.data.pipeline import train_dataset

    ds = train_dataset(source, FLAGS.resolution, FLAGS.batch_size, augment=augment, seed=0)
    iterator = iter(ds)
    for _ in range(5):
        next(iterator)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        images, _ = next(iterator)
    images.numpy()
    return FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)


def advprop_step_rate():
    import tensorflow as tf

    from advprop_tf.benchmarking import time_interleaved
    from advprop_tf.attacks.pgd import AttackConfig
    from advprop_tf.methods import get_method
    from advprop_tf.models import build_efficientnet
    from advprop_tf.training.optimization import make_optimizer, make_schedule
    from advprop_tf.training.step import StepConfig, TrainStep

    size, batch = FLAGS.resolution, FLAGS.model_batch_size
    pixels = tf.random.uniform([batch, size, size, 3], 0, 255)
    labels = tf.random.uniform([batch], 0, 10, tf.int32)
    model = build_efficientnet("efficientnet-b0", num_classes=10, domains=("clean", "adv"), resolution=size)
    optimizer = make_optimizer("rmsprop", make_schedule("constant", 0.01, 100, 100, 0), model)
    config = StepConfig(global_batch_size=batch, num_classes=10,
                        attack=AttackConfig(epsilon=1.0, num_steps=1, step_size=1.0))
    step = TrainStep(model, get_method("advprop"), optimizer, config)
    seconds = time_interleaved({"advprop": lambda: step.run_batch(pixels, labels)["loss"]},
                               warmup=2, rounds=3, steps=2)["advprop"]
    return batch / seconds


def main(argv):
    del argv
    from advprop_tf.data.sources import parse_source
    from advprop_tf.data.tfrecord_writer import write_tfrecords

    import tensorflow as tf

    from advprop_tf.paths import join

    if not tf.io.gfile.isdir(FLAGS.data):
        print(f"benchmark_input: error: --data: {FLAGS.data!r} is not a directory", file=sys.stderr)
        sys.exit(2)
    if not tf.io.gfile.exists(join(FLAGS.tfrecord_dir, "train-00000-of-00016")):
        print(f"writing TFRecords of {FLAGS.data} to {FLAGS.tfrecord_dir} ...", flush=True)
        write_tfrecords(FLAGS.data, FLAGS.tfrecord_dir, train_shards=16, validation_shards=1,
                        progress=lambda line: print("  " + line, flush=True))
    sources = {
        "folder": parse_source(f"folder:{FLAGS.data}"),
        "tfrecord": parse_source(f"tfrecord:{FLAGS.tfrecord_dir}", num_classes=10),
    }
    rates = {}
    for name, source in sources.items():
        for augment in ("none", "randaugment", "autoaugment"):
            rates[f"{name}_{augment}"] = pipeline_rate(source, augment)
            print(f"  {name:8s} {augment:12s} {rates[f'{name}_{augment}']:7.1f} images/s", flush=True)
    model_rate = advprop_step_rate()
    print(f"B0 AdvProp (PGD-1) step at {FLAGS.resolution}px, batch {FLAGS.model_batch_size}: "
          f"{model_rate:.1f} clean images/s consumed")
    for key, rate in rates.items():
        print(f"  {key:22s} {rate / model_rate:6.1f}x the step's consumption")
    print("  target: >= 5x without augmentation (folder_none, tfrecord_none)")
    if FLAGS.json:
        print(json.dumps({"advprop_step_images_per_s": round(model_rate, 2),
                          **{f"{k}_images_per_s": round(v, 1) for k, v in rates.items()},
                          **{f"{k}_ratio": round(v / model_rate, 2) for k, v in rates.items()}}))


if __name__ == "__main__":
    app.run(main)
