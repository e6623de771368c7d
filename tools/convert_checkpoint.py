"""Convert the authors' TF1 EfficientNet / AdvProp checkpoints (or Keras .h5 weights) for advprop_tf.

  python tools/convert_checkpoint.py --source=efficientnet-b3/ --model=efficientnet-b3 \
      --output=converted/b3-advprop --advprop [--use_ema=true] [--export]

--source is a checkpoint directory (its `checkpoint` file or single *.index),
a checkpoint prefix (.../model.ckpt), or a keras.applications weight file
(.h5 / .weights.h5). Every weight of the model must be found with the right
shape (else exit 2 naming the variable); the EMA shadows are preferred;
optimizer slots are ignored; other unused variables are listed.
--advprop: AdvProp checkpoints take pixels scaled to [-1, 1] ("inception"
normalization); without it, ImageNet mean/std. The output is a directory that
`python -m advprop_tf.train --init_checkpoint=<output>`, `advprop_tf.export`
and `advprop_tf.evaluate --model_dir=<output>` read directly; --export also
writes the SavedModel (main BN) to <output>/export/1.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from advprop_tf import cli  # noqa: E402

flags.DEFINE_string("source", None, "Authors' checkpoint directory or prefix, or a Keras .h5 weight file.")
flags.DEFINE_string("model", None, "efficientnet-b0 ... efficientnet-b8, efficientnet-l2.")
flags.DEFINE_string("output", None, "Directory to write (must not hold a checkpoint yet).")
flags.DEFINE_bool("advprop", False, "An AdvProp checkpoint: inputs normalized to [-1, 1].")
flags.DEFINE_bool("use_ema", True, "Take the ExponentialMovingAverage shadows (what the authors evaluate).")
flags.DEFINE_integer("num_classes", None, "Classes (default: from the checkpoint's head; 1000 for .h5).")
flags.DEFINE_integer("resolution", None, "Input size (default: the model's).")
flags.DEFINE_float("width_coefficient", None, "Width override (for non-standard checkpoints).")
flags.DEFINE_float("depth_coefficient", None, "Depth override (for non-standard checkpoints).")
flags.DEFINE_bool("export", False, "Also export a SavedModel to <output>/export/1.")
FLAGS = flags.FLAGS


def main(argv):
    from advprop_tf.conversion import convert
    from advprop_tf.errors import ConfigError

    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    try:
        # an AdvProp checkpoint takes pixels in [-1, 1]: "inception" normalization
        print(convert(FLAGS.source, FLAGS.model, FLAGS.output, inception_normalization=FLAGS.advprop, use_ema=FLAGS.use_ema,
                      num_classes=FLAGS.num_classes, resolution=FLAGS.resolution,
                      width_coefficient=FLAGS.width_coefficient, depth_coefficient=FLAGS.depth_coefficient,
                      export_saved_model=FLAGS.export))
    except ConfigError as e:
        cli.fail_setting("convert_checkpoint", e, lambda field: {"inception_normalization": "advprop"}.get(field, field))


def fail(message):
    cli.fail("convert_checkpoint", message)


if __name__ == "__main__":
    cli.run(main, "convert_checkpoint")
