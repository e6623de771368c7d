"""python -m advprop_tf.train --flagfile=configs/<x>.flags [--flag=value ...]

Trains with the chosen method (AdvProp by default), resumes from --model_dir,
evaluates with the EMA weights and the main BN, writes eval_results.json, and
(--export, the default) exports the main-BN SavedModel. Bad flags exit with
status 2 and one line naming the flag.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

from advprop_tf import cli, train_flags  # noqa: E402
from advprop_tf.errors import ConfigError  # noqa: E402

PROGRAM = "advprop_tf.train"


def train_and_export(config, strategy=None):
    """Train (or resume) as `config` says, then export the main-BN SavedModel when asked (the chief only).
    Returns (trainer, export path or None)."""
    from advprop_tf.serving import export
    from advprop_tf.training.loop import run_training

    trainer = run_training(config, strategy)
    path = None
    if trainer.results is not None and config.run.export and trainer.run_dir.is_chief:
        path = export(config.run.model_dir, trainer.run_dir.export_dir, use_ema=trainer.ema is not None)
        logging.info("exported the main-BN inference model to %s", path)
    return trainer, path


def main(argv, flag_values=flags.FLAGS):
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments {argv[1:]}; flags are written --name=value")
    from advprop_tf.training.loop import NonFiniteLossError

    logging.get_absl_handler().python_handler.stream = sys.stdout
    try:
        trainer, _ = train_and_export(train_flags.config_from_flags(flag_values))
    except ConfigError as e:
        cli.fail_setting(PROGRAM, e, train_flags.flag_of)
    except NonFiniteLossError as e:
        print(f"{PROGRAM}: {e}", file=sys.stderr)
        sys.exit(1)
    if trainer.results is not None:
        print(f"final: top-1 {trainer.results['top_1']:.4f} top-5 {trainer.results['top_5']:.4f} "
              f"at step {trainer.results['step']} ({trainer.run_dir.file('eval_results.json')})")


def run(flag_values=flags.FLAGS, argv=None):
    """The command line (sys.argv by default); on fresh `flag_values`, the same command in-process."""
    train_flags.define_train_flags(flag_values)
    cli.run(lambda args: main(args, flag_values), PROGRAM, flag_values, argv)


if __name__ == "__main__":
    run()
