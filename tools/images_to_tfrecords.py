"""Convert an image folder (one sub-folder per class) into TFRecords in the authors' ImageNet format.

  python tools/images_to_tfrecords.py --input=/data/my-images --output=/data/my-tfrecords \
      [--holdout_fraction=0.1] [--train_shards=16] [--validation_shards=4]

Then train with --dataset=tfrecord:/data/my-tfrecords --num_classes=<classes>.
Labels are 1-based as in the authors' shards (the reader subtracts 1); the
class order is the sorted folder names; undecodable files are skipped and
listed. Shards appear under their final name only when complete.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from advprop_tf import cli  # noqa: E402

flags.DEFINE_string("input", None, "Image folder: one sub-folder per class.")
flags.DEFINE_string("output", None, "Directory for the shards.")
flags.DEFINE_float("holdout_fraction", 0.0, "Fraction held out as the validation split (same rule as folder:).")
flags.DEFINE_integer("train_shards", 16, "Train shards.")
flags.DEFINE_integer("validation_shards", 4, "Validation shards.")
flags.DEFINE_integer("seed", 12345, "Seed of the order of the examples within the shards.")
FLAGS = flags.FLAGS


def fail(message):
    cli.fail("images_to_tfrecords", message)


def main(argv):
    from advprop_tf.data.sources import SourceError
    from advprop_tf.data.sources import folder_files
    from advprop_tf.data.tfrecord_writer import write_tfrecords
    from advprop_tf.paths import join
    from advprop_tf.training.run_dir import write_atomically

    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    for name in ("input", "output"):
        if not FLAGS[name].value:
            fail(f"--{name}: is required")
    if not 0 <= FLAGS.holdout_fraction < 1:
        fail(f"--holdout_fraction: must be in [0, 1), got {FLAGS.holdout_fraction:g}")
    try:
        _, classes = folder_files(FLAGS.input, FLAGS.holdout_fraction)
        report = write_tfrecords(FLAGS.input, FLAGS.output, FLAGS.train_shards, FLAGS.validation_shards,
                                 FLAGS.holdout_fraction, FLAGS.seed, progress=print)
    except SourceError as e:
        fail(f"--input: {e}")
    except ValueError as e:
        fail(str(e))
    for split, count in report.written.items():
        print(f"{split}: {count} images in {len(report.files[split])} shards")
    if report.skipped:
        print(f"skipped {len(report.skipped)} undecodable files: {', '.join(report.skipped)}")
    write_atomically(join(FLAGS.output, "labels.txt"), "\n".join(classes) + "\n")
    print(f"train with --dataset=tfrecord:{FLAGS.output} --num_classes={len(classes)}")


if __name__ == "__main__":
    cli.run(main, "images_to_tfrecords")
