"""python -m advprop_tf.train --flagfile=configs/<x>.flags [--flag=value ...]

Trains with the chosen method (AdvProp by default), resumes from --model_dir,
evaluates with the EMA weights and the main BN, writes eval_results.json, and
(--export, the default) exports the main-BN SavedModel.

Exit status, as schedulers read it:
  0   training reached --train_steps (and was exported when asked);
  2   a user's mistake: one line naming the flag or file;
  42  stopped before --train_steps (a SIGTERM, a preemption, a lost peer worker): a checkpoint is
      saved, and rerunning the same command (on every worker) resumes it. Kubernetes Jobs
      (podFailurePolicy), Slurm (--requeue) and TPU VM start-up scripts can restart on it;
      TensorFlow's own failure handling uses the same code;
  1   anything else (a non-finite loss with --on_nan=stop: the last good checkpoint is kept).
"""

from __future__ import annotations

import sys

from advprop_tf.startup import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()  # before anything imports TensorFlow: its C++ start-up notices held back

from absl import flags, logging  # noqa: E402

from advprop_tf import cli, train_flags  # noqa: E402
from advprop_tf.errors import ConfigError  # noqa: E402

PROGRAM = "advprop_tf.train"


RESTART_EXIT_CODE = 42  # stopped before --train_steps; the same command resumes (tf.distribute's failure handling's)


def train_and_export(config, strategy=None):
    """Train (or resume) as `config` says; once training has finished, export the main-BN SavedModel when asked
    (the chief only), whether or not an evaluation ran. Returns (trainer, export path or None)."""
    from advprop_tf.serving import export
    from advprop_tf.training.loop import run_training

    trainer = run_training(config, strategy)
    path = None
    if trainer.finished and config.run.export and trainer.run_dir.is_chief:
        path = export(config.run.model_dir, trainer.run_dir.export_dir, use_ema=trainer.ema is not None)
        logging.info("exported the main-BN inference model to %s", path)
    return trainer, path


def stopped(reason: str, model_dir: str, checkpoint: str | None):
    """The last line of a run stopped before its end, and the restart code."""
    resume = f"resumes from {checkpoint}" if checkpoint else "starts again from step 0 (no checkpoint yet)"
    print(f"{PROGRAM}: stopped before --train_steps ({reason}). Rerunning the same command {resume} in "
          f"--model_dir={model_dir}; on several workers, restart every worker with the same command. "
          f"Exit {RESTART_EXIT_CODE}.", file=sys.stderr)
    sys.exit(RESTART_EXIT_CODE)


def main(argv, flag_values=flags.FLAGS):
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments {argv[1:]}; flags are written --name=value")
    from advprop_tf.training.loop import NonFiniteLossError, PeerLostError

    logging.get_absl_handler().python_handler.stream = sys.stdout
    config = None
    try:
        config = train_flags.config_from_flags(flag_values)
        trainer, path = train_and_export(config)
    except ConfigError as e:
        cli.fail_setting(PROGRAM, e, train_flags.flag_of)
    except NonFiniteLossError as e:
        print(f"{PROGRAM}: {e}", file=sys.stderr)
        sys.exit(1)
    except PeerLostError as e:
        stopped(str(e), config.run.model_dir, e.checkpoint)
    if not trainer.finished:
        stopped(f"{trainer.stop_reason} at step {trainer.step} of {trainer.total_steps}", config.run.model_dir,
                trainer.resume_checkpoint)
    exported = f"; exported to {path}" if path else ""
    if trainer.results is not None:
        print(f"final: top-1 {trainer.results['top_1']:.4f} top-5 {trainer.results['top_5']:.4f} "
              f"at step {trainer.results['step']} ({trainer.run_dir.file('eval_results.json')}){exported}")
    else:
        print(f"final: trained to step {trainer.step}; no evaluation ({trainer.no_evaluation_reason}){exported}")


def run(flag_values=flags.FLAGS, argv=None):
    """The command line (sys.argv by default); on fresh `flag_values`, the same command in-process."""
    train_flags.define_train_flags(flag_values)
    cli.run(lambda args: main(args, flag_values), PROGRAM, flag_values, argv, usage=__doc__,
            groups=train_flags.flag_groups())


if __name__ == "__main__":
    run()
