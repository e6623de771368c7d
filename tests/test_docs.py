"""The README and docs/ stay honest: the README's length, and every command they show parses.

Every `python -m advprop_tf.<command>` and `python tools/<tool>.py` line of a bash block in README.md
and docs/*.md (continuation lines joined) is parsed by that command's own flags, flagfiles included:
a renamed or removed flag, a mistyped value or a config file that no longer exists fails here. The
README's two set-up commands run in test_readme.py.
"""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 200


def documented_commands():
    """(file, argv) of every python command line in the bash blocks of README.md and docs/*.md."""
    found = []
    for path in ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))):
        text = open(os.path.join(REPO, path), encoding="utf-8").read()
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.strip()
                if line.startswith("python "):
                    found.append((path, shlex.split(line, comments=True)))
    return found


COMMANDS = documented_commands()
CLI = [(path, argv) for path, argv in COMMANDS if argv[1] == "-m"]
TOOLS = [(path, argv) for path, argv in COMMANDS if argv[1].startswith("tools/")]


def test_the_readme_is_short_and_every_command_is_found():
    lines = open(os.path.join(REPO, "README.md"), encoding="utf-8").read().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines"
    assert {argv[2] for _, argv in CLI} == {"advprop_tf.train", "advprop_tf.evaluate", "advprop_tf.export"}
    assert all(argv[2].startswith("advprop_tf.") for _, argv in CLI)
    assert len(CLI) >= 20 and TOOLS


def define(command):
    from advprop_tf import evaluate, export, train_flags

    fv = flags.FlagValues()
    {"advprop_tf.train": train_flags.define_train_flags, "advprop_tf.evaluate": evaluate.define_flags,
     "advprop_tf.export": export.define_flags}[command](fv)
    return fv


@pytest.mark.parametrize("path, argv", CLI, ids=[f"{p}:{' '.join(a[2:4])}"[:80] for p, a in CLI])
def test_a_documented_command_parses(path, argv, monkeypatch):
    monkeypatch.chdir(REPO)  # flagfiles are given relative to the checkout
    fv = define(argv[2])
    fv([argv[2], *argv[3:]])  # raises flags.Error on an unknown flag or a bad value
    if argv[2] == "advprop_tf.train":
        from advprop_tf.errors import ConfigError
        from advprop_tf.train_flags import config_from_flags

        try:
            config_from_flags(fv)  # and the typed config accepts the combination
        except ConfigError as e:  # but the example's own data and run paths are not on this machine
            if "does not exist" not in e.reason and "cannot check 'gs://" not in e.reason:
                raise


TOOL_PARSER = r"""
import importlib.util, json, sys
from absl import flags
path, commands = sys.argv[1], json.loads(sys.argv[2])
spec = importlib.util.spec_from_file_location("documented_tool", path)
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # defines the tool's flags
for argv in commands:
    flags.FLAGS.unparse_flags()
    flags.FLAGS([path, *argv])
print("parsed", len(commands))
"""


def test_the_documented_tool_commands_parse():
    by_tool = {}
    for _, argv in TOOLS:
        by_tool.setdefault(argv[1], []).append(argv[2:])
    for tool, commands in by_tool.items():
        result = subprocess.run([sys.executable, "-c", TOOL_PARSER, tool, json.dumps(commands)], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and f"parsed {len(commands)}" in result.stdout, (tool, result.stderr[-2000:])


@pytest.mark.parametrize("command, titles", [
    ("advprop_tf.train", ["data", "model", "method and attack", "optimization", "run and checkpoints", "distribution"]),
    ("advprop_tf.evaluate", ["what to evaluate", "data", "attack", "batch norm", "corruptions", "output"]),
    ("advprop_tf.export", ["export"]),
])
def test_help_lists_the_commands_own_flags_by_group_with_their_defaults(command, titles):
    result = subprocess.run([sys.executable, "-m", command, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.startswith(f"python -m {command} ")  # the command's usage first
    assert re.findall(r"^([\w ]+):\n  --", out, re.M) == titles  # each group's title, then its flags
    listed = re.findall(r"^  --(\w+): ", out, re.M)
    own = list(define(command))
    assert sorted(listed) == sorted(own), "every flag of the command, and only those"
    assert "--only_check_args" not in out and "--xla_" not in out and out.rstrip().endswith("absl's too.")
    if command == "advprop_tf.train":
        assert re.search(r"^  --epsilon: .*\(default: '1\.0'\)", out, re.M)
        assert re.search(r"^  --model: ", out, re.M) and "(default: 'efficientnet-b0')" in out
