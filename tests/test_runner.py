"""The suite's runner (conftest.py): files in their own processes, every result counted by the parent pytest."""

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_parent_counts_each_childs_tests_and_a_dead_child_fails_its_unreported_tests(tmp_path):
    suite = tmp_path / "tests"
    suite.mkdir()
    for name in ("conftest.py", "helpers.py"):  # the runner as it is, with what it imports
        shutil.copy(os.path.join(REPO, "tests", name), suite / name)
    (suite / "__init__.py").write_text("")
    (suite / "test_a.py").write_text("def test_ok():\n    pass\n\n\ndef test_bad():\n    assert 1 == 2, 'one is not two'\n")
    (suite / "test_b.py").write_text("import os\n\n\ndef test_first():\n    pass\n\n\n"
                                     "def test_dies():\n    os._exit(3)\n\n\ndef test_after():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADVPROP_TEST_")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 1, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("3 failed, 2 passed"), out[-3000:]
    assert "FAILED tests/test_a.py::test_bad - AssertionError: one is not two" in out
    for name in ("test_dies", "test_after"):  # never reported by their dead process
        assert f"FAILED tests/test_b.py::{name} - its test process exited with status 3" in out
    assert "tests/test_a.py: 1 failed, 1 passed" in out  # the per-file line, from the child's own summary
