"""What every command line of the package shares: one-line errors with exit status 2."""

from __future__ import annotations

import sys

from absl import app, flags


def fail(program: str, message: str):
    """Print `<program>: error: <message>` on stderr and exit with status 2 (a usage error)."""
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)


def run(main, program: str, flag_values=flags.FLAGS):
    """absl's app.run, with flag-parsing errors reported as one line by `fail`."""

    def parse(argv):
        try:
            return flag_values(argv)
        except flags.Error as e:
            fail(program, str(e).splitlines()[0])

    app.run(main, flags_parser=parse)
