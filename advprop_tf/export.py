"""python -m advprop_tf.export --model_dir=<training dir> [--export_dir=<dir>] [--domain=clean] [--use_ema] [--version=N]

Writes a float32 SavedModel with ONE BN set (the main one by default;
"adv" gives the robust network) under export_dir/<version>/; see
advprop_tf/serving.py for its signatures. Bad flags exit with status 2 and
one line naming the flag.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from advprop_tf import cli  # noqa: E402
from advprop_tf.domains import MAIN  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("model_dir", None, "Training directory (checkpoints, run_config.json).")
    flags.DEFINE_string("export_dir", None, "Where versioned SavedModels go (default: <model_dir>/export).")
    flags.DEFINE_string("domain", MAIN, f"BN domain to export: {MAIN} (main) or an auxiliary one, e.g. adv.")
    flags.DEFINE_bool("use_ema", None, "Export the EMA averages (as evaluated) rather than the raw weights "
                      "(default: when the run kept an EMA).")
    flags.DEFINE_integer("version", None, "Version sub-directory (default: next free integer).")


def fail(message):
    cli.fail("advprop_tf.export", message)


def main(argv):
    from advprop_tf.errors import ConfigError
    from advprop_tf.serving import export
    from advprop_tf.training.run_dir import RunDir

    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    try:
        path = export(FLAGS.model_dir, FLAGS.export_dir or RunDir(FLAGS.model_dir).export_dir,
                      FLAGS.domain, FLAGS.use_ema, FLAGS.version)
    except ConfigError as e:
        cli.fail_setting("advprop_tf.export", e)
    print(f"exported {path}")


if __name__ == "__main__":
    define_flags()
    cli.run(main, "advprop_tf.export")
