"""python -m advprop_tf.train --flagfile=configs/<x>.flags [--flag=value ...]

Trains with the chosen method (AdvProp by default), resumes from --model_dir,
evaluates with the EMA weights and the main BN, and writes eval_results.json.
Bad flags exit with status 2 and one line naming the flag.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

from advprop_tf import cli, config  # noqa: E402

config.define_train_flags()
FLAGS = flags.FLAGS


def fail(message: str):
    cli.fail("advprop_tf.train", message)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags are written --name=value")
    try:
        config.validate_train_flags(FLAGS)
    except config.FlagError as e:
        fail(str(e))
    from advprop_tf.data.sources import SourceError
    from advprop_tf.training.loop import NonFiniteLossError, run_training
    from advprop_tf.training.run_dir import RunDirError

    cfg = config.config_from_flags(FLAGS)
    logging.get_absl_handler().python_handler.stream = sys.stdout
    try:
        trainer = run_training(cfg)
    except SourceError as e:
        fail(f"--dataset: {e}")
    except RunDirError as e:
        fail(str(e))
    except NonFiniteLossError as e:
        print(f"advprop_tf.train: {e}", file=sys.stderr)
        sys.exit(1)
    except ValueError as e:  # includes InitError and ExportError, which name their flag
        if str(e).startswith("--"):
            fail(str(e))
        raise
    if trainer.results is not None:
        print(f"final: top-1 {trainer.results['top_1']:.4f} top-5 {trainer.results['top_5']:.4f} "
              f"at step {trainer.results['step']} ({trainer.run_dir.file('eval_results.json')})")


def run():
    cli.run(main, "advprop_tf.train")


if __name__ == "__main__":
    run()
