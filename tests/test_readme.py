"""The README's two commands stay true: the main job runs to completion, CI runs the test command."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

from tests.helpers import as_users_run_it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    install_run, install_test = commands
    assert install_run.startswith('pip install -e ".[cpu]" && python -m advprop_tf.train --flagfile=configs/demo.flags')
    assert install_test.startswith('pip install -e ".[cpu,test]" && ') and "pytest" in install_test
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert f"cmd='{install_test}'" in ci and "README.md" in ci


def test_readme_main_command_runs_to_completion(tmp_path):
    """The demo command, shortened to 20 steps (flags after --flagfile override it), trains,
    evaluates, exports and reports progress. Its full 1000-step accuracy is measured in the
    README; that AdvProp learns the synthetic set is tests/test_methods.py's job."""
    train_part = readme_commands()[0].split("&&", 1)[1]
    args = shlex.split(train_part)
    assert args[:3] == ["python", "-m", "advprop_tf.train"]
    args = [a for a in args if not a.startswith("--model_dir")]
    env = as_users_run_it()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # a newcomer's shell has none: the command sets it
    result = subprocess.run([sys.executable, *args[1:], f"--model_dir={tmp_path}", "--train_steps=20",
                             "--steps_per_loop=10"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.load(open(tmp_path / "eval_results.json"))
    assert results["step"] == 20 and results["ema"] is True and results["examples"] == 640
    assert os.path.isdir(tmp_path / "export" / "1")  # and it exported the main-BN model
    assert "final: top-1" in result.stdout
    assert "img/s" in result.stdout and "ETA" in result.stdout
    # our lines, not TensorFlow's INFO chatter (it logged this at every checkpoint)
    assert "Sharding callback duration" not in result.stdout + result.stderr
    assert "INFO:tensorflow" not in result.stdout + result.stderr
    # the console before training starts holds our lines only: no TensorFlow C++ start-up notice (oneDNN,
    # cpu_feature_guard, absl's "before absl::InitializeLog()"), each line one of our modules' log lines
    console = (result.stderr + result.stdout).splitlines()
    first = console[:next(i for i, line in enumerate(console) if "training steps 0 to 20" in line)]
    ours = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "advprop_tf", "**", "*.py"), recursive=True)}
    for line in first:
        logged = re.match(r"^[IWE]\d{4} [\d:.]+ +\d+ (\w+\.py):\d+\] ", line)
        assert logged and logged.group(1) in ours, f"not our line: {line!r}"
    assert not any("oneDNN" in line or "InitializeLog" in line or "cpu_feature_guard" in line for line in console)
