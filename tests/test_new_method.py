"""A new training method is one registered function: written outside the package, trained through the CLI."""

import json
import os
import subprocess
import sys

import numpy as np

from tests.helpers import run_train_command
from tests.test_training import REPO, TINY

# The whole method, as a user would write it: 22 lines, no other module touched.
GAUSSIAN_NOISE_METHOD = '''
"""Clean images through the main BN, a Gaussian-noise copy of them through a BN of its own."""
import tensorflow as tf

from advprop_tf import randomness
from advprop_tf.domains import MAIN
from advprop_tf.methods import clean_view, loss_and_metrics, register

NOISE_STD = 16.0  # pixels


@register("gaussian_noise", generated_domains=("noise",), attacks=False)
def gaussian_noise(model, images, labels, ctx):
    clean = clean_view(images)
    noise = tf.random.stateless_normal(tf.shape(clean), randomness.fold_in(ctx.seed, 5), stddev=NOISE_STD)
    noisy = tf.clip_by_value(clean + noise, 0.0, 255.0)
    logits = model(tf.concat([clean, noisy], 0), training=True, domain=(MAIN, "noise"))
    clean_logits, noisy_logits = tf.split(logits, 2)
    clean_loss, metrics = loss_and_metrics("clean", labels, clean_logits, ctx)
    noisy_loss, noisy_metrics = loss_and_metrics("noise", labels, noisy_logits, ctx)
    metrics.update(noisy_metrics)
    total = ctx.clean_weight * tf.reduce_sum(clean_loss) + ctx.adv_weight * tf.reduce_sum(noisy_loss)
    return total, metrics
'''


def test_a_method_written_outside_the_package_trains_evaluates_and_exports_through_the_cli(tmp_path, capsys):
    (tmp_path / "noise_method.py").write_text(GAUSSIAN_NOISE_METHOD)
    model_dir = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in TINY.items()]
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "-m", "advprop_tf.train", f"--model_dir={model_dir}", *args,
                             "--train_steps=4", "--method_modules=noise_method", "--method=gaussian_noise"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "noise acc" in result.stdout + result.stderr  # the method's metrics reach the log
    run = json.load(open(model_dir / "run_config.json"))
    assert run["method"] == "gaussian_noise" and run["model"]["domains"] == ["clean", "noise"]
    assert json.load(open(model_dir / "eval_results.json"))["step"] == 4
    from advprop_tf.training.trained import load_trained

    model = load_trained(str(model_dir)).model
    noise_mean = [layer.domain_variables("noise")["moving_mean"].numpy() for layer in model.bn_layers()]
    assert noise_mean and any(np.abs(v).max() > 0 for v in noise_mean)  # its own BN learned statistics
    assert os.path.exists(model_dir / "export" / "1" / "saved_model.pb")
    # without --method_modules the method does not exist (this process never imported noise_method)
    code, stderr = run_train_command([f"--model_dir={tmp_path / 'x'}", "--method=gaussian_noise"], capsys)
    assert code == 2 and "--method: unknown method 'gaussian_noise'" in stderr
