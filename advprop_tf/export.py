"""python -m advprop_tf.export --model_dir=<training dir> [--export_dir=<dir>] [--domain=clean] [--use_ema] [--version=N]

Writes a float32 SavedModel with ONE BN set (the main one by default;
"adv" gives the robust network) under export_dir/<version>/; see
advprop_tf/serving.py for its signatures. Bad flags exit with status 2 and
one line naming the flag.
"""

from __future__ import annotations


from advprop_tf.startup import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()  # before anything imports TensorFlow: its C++ start-up notices held back

from absl import flags  # noqa: E402

from advprop_tf import cli  # noqa: E402
from advprop_tf.domains import MAIN  # noqa: E402

PROGRAM = "advprop_tf.export"


def define_flags(flag_values=flags.FLAGS):
    define = dict(flag_values=flag_values)
    flags.DEFINE_string("model_dir", None, "Training directory (checkpoints, run_config.json).", **define)
    flags.DEFINE_string("export_dir", None, "Where versioned SavedModels go (default: <model_dir>/export).",
                        **define)
    flags.DEFINE_string("domain", MAIN, f"BN domain to export: {MAIN} (main) or an auxiliary one, e.g. adv.",
                        **define)
    flags.DEFINE_bool("use_ema", None, "Export the EMA averages (as evaluated) rather than the raw weights "
                      "(default: when the run kept an EMA).", **define)
    flags.DEFINE_integer("version", None, "Version sub-directory (default: next free integer).", **define)


def fail(message):
    cli.fail(PROGRAM, message)


def main(argv, flag_values=flags.FLAGS):
    from advprop_tf.errors import ConfigError
    from advprop_tf.serving import export
    from advprop_tf.training.run_dir import RunDir

    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    model_dir = flag_values.model_dir
    try:
        path = export(model_dir, flag_values.export_dir or RunDir(model_dir).export_dir,
                      flag_values.domain, flag_values.use_ema, flag_values.version)
    except ConfigError as e:
        cli.fail_setting(PROGRAM, e)
    print(f"exported {path}")


def run(flag_values=flags.FLAGS, argv=None):
    """The command line (sys.argv by default); on fresh `flag_values`, the same command in-process."""
    define_flags(flag_values)
    cli.run(lambda args: main(args, flag_values), PROGRAM, flag_values, argv, usage=__doc__,
            groups={"export": ["model_dir", "export_dir", "domain", "use_ema", "version"]})


if __name__ == "__main__":
    run()
