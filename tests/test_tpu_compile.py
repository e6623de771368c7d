"""tools/tpu_compile.py: the TPU compiler (libtpu, through jax's compile-only topologies) compiles our step
for a TPU core on this CPU machine, and says when a batch does not fit the chip's HBM."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="jax[tpu] 0.10.2 needs Python 3.11")


def compile_for_v5e(tmp_path, *args):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "tools/tpu_compile.py", "--flagfile=configs/demo.flags",
                             "--topology=v5e:2x2", f"--json={out}", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.load(open(out))["at_config_batch"], result.stdout


def test_the_demo_networks_whole_replica_step_compiles_for_a_v5e_core(tmp_path):
    """Attack, forward, backward, BN statistics, optimizer, EMA: one TPU program, with its HBM."""
    result, stdout = compile_for_v5e(tmp_path, "--per_core_batch=16")
    assert result["compiled"] and result["fits"], result
    assert result["per_core_batch"] == 16 and result["hbm_bytes"] == 16 * 10**9
    for key in ("argument_bytes", "temp_bytes", "code_bytes"):
        assert result[key] > 0, key
    assert result["flops"] > 1e8  # the whole step (the forward pass of 16 images alone is ~1e8)
    assert "train step, 16 images per core, v5e:2x2: compiled in" in stdout and "(fits)" in stdout


def test_a_batch_larger_than_the_chip_is_reported_as_not_fitting_with_its_bytes(tmp_path):
    """The evaluation step (quick to compile) at 16384 images of 224 px: about 30 GiB, on a 16 GB v5e chip."""
    result, stdout = compile_for_v5e(tmp_path, "--step=eval", "--resolution=224", "--per_core_batch=16384")
    assert not result["fits"], result
    if result["compiled"]:
        assert result["hbm_used_bytes"] > result["hbm_bytes"]
        assert "does NOT fit" in stdout and f"{result['hbm_used_bytes'] / 2**30:.2f} GiB of 14.90 GiB" in stdout
    else:  # the compiler refuses it (libtpu 0.0.42.1): its own words give the bytes
        assert "RESOURCE_EXHAUSTED: Ran out of memory on HBM" in result["error"], result["error"]
        assert "eval step, 16384 images per core, v5e:2x2: does NOT fit (" in stdout
