"""What every command line of the package shares: one-line errors with exit status 2."""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags
from absl import logging


def fail(program: str, message: str):
    """Print `<program>: error: <message>` on stderr and exit with status 2 (a usage error)."""
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)


def fail_setting(program: str, error, flag_of=lambda field: field):
    """fail() for a ConfigError: `--<its field's flag>: <reason>`."""
    fail(program, f"--{flag_of(error.field)}: {error.reason}")


class _OursOrWarnings(std_logging.Filter):
    """Let through this package's log lines and anyone's warnings and errors."""

    package = os.path.dirname(os.path.abspath(__file__))

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or record.pathname.startswith(self.package)


def show_only_our_log_lines():
    """The console shows our INFO lines, not TensorFlow's (e.g. "Sharding callback duration" at
    every checkpoint, "Assets written to"). TensorFlow's C++ start-up lines printed before its
    logging is initialized cannot be silenced from Python."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OursOrWarnings) for f in handler.filters):  # once, however many commands run
        handler.addFilter(_OursOrWarnings())
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)


def run(main, program: str, flag_values=flags.FLAGS, argv=None):
    """absl's app.run (on sys.argv by default), with flag-parsing errors reported as one line by `fail`,
    and quiet logs."""

    def parse(argv):
        show_only_our_log_lines()
        try:
            parsed = flag_values(argv)
        except flags.Error as e:
            message = str(e)  # absl's message continues with the flag's help
            fail(program, message.splitlines()[0])
        if not flags.FLAGS.is_parsed():  # a command on its own FlagValues: absl's (--run_with_pdb...) at defaults
            flags.FLAGS.mark_as_parsed()
        return parsed

    app.run(main, argv=argv, flags_parser=parse)
