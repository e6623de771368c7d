"""What every command line of the package shares: one-line errors with exit status 2."""

from __future__ import annotations

import logging as std_logging
import os
import sys
import textwrap

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


HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-?")


def help_text(usage: str, flag_values, groups) -> str:
    """The command's docstring and ITS flags (not TensorFlow's or absl's), by group, each with its default."""
    lines = [(usage or "").strip(), ""]
    for title, names in groups.items():
        lines.append(f"{title}:")
        for name in names:
            flag = flag_values[name]
            default = "" if flag.default is None else f" (default: {flag.default_as_str or repr(flag.default)})"
            text = " ".join((flag.help or "").split()) + default
            lines.extend(textwrap.wrap(text, 100, initial_indent=f"  --{name}: ", subsequent_indent="      "))
        lines.append("")
    lines.append("Try --helpfull for every flag, TensorFlow's and absl's too.")
    return "\n".join(lines)


def own_flags(flag_values) -> dict:
    """{"flags": the names of the flags this package's modules or the running script defined} (a command
    without groups)."""
    names = []
    for module, defined in flag_values.flags_by_module_dict().items():
        if module.startswith("advprop_tf") or module in ("__main__", sys.argv[0]):  # absl names a script by its path
            names.extend(flag.name for flag in defined if flag.name not in names)
    return {"flags": names}


def run(main, program: str, flag_values=flags.FLAGS, argv=None, usage=None, groups=None):
    """absl's app.run (on sys.argv by default), with flag-parsing errors reported as one line by `fail`,
    --help listing the command's own flags (by `groups`: title -> flag names), and quiet logs."""
    arguments = sys.argv if argv is None else argv
    if any(a in HELP_FLAGS for a in arguments[1:]):
        usage = usage if usage is not None else sys.modules["__main__"].__doc__
        print(help_text(usage, flag_values, groups or own_flags(flag_values)))
        sys.exit(0)

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
