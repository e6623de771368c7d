"""SavedModel export: one BN set, two signatures, EMA weights, TF-only loading, clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.serving import export
from advprop_tf.training.run_dir import RunDir
from advprop_tf.models import build_efficientnet
from advprop_tf.models.registry import model_from_config
from advprop_tf.training.ema import ExponentialMovingAverage
from tests.helpers import as_users_run_it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter that imports nothing of advprop_tf.
TF_ONLY_READER = r"""
import json, sys
import numpy as np
import pytest
import tensorflow as tf
assert not any(m.startswith("advprop_tf") for m in sys.modules)
export_dir, pixels_path, jpeg_path = sys.argv[1:4]
loaded = tf.saved_model.load(export_dir)
out = {"signatures": {}}
for name, fn in loaded.signatures.items():
    inputs = fn.structured_input_signature[1]
    out["signatures"][name] = {
        "inputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in inputs.items()},
        "outputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in fn.structured_outputs.items()},
    }
pixels = np.load(pixels_path)
res = loaded.signatures["predict_pixels"](pixels=tf.constant(pixels))
out["logits"] = res["logits"].numpy().tolist()
out["probabilities"] = res["probabilities"].numpy().tolist()
jpeg = open(jpeg_path, "rb").read()
res = loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg, jpeg]))
out["bytes_probabilities"] = res["probabilities"].numpy().tolist()
out["bytes_classes"] = res["classes"].numpy().tolist()
try:
    loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg, b"not an image, just bytes"]))
    out["bad_error"] = None
except tf.errors.InvalidArgumentError as e:
    out["bad_error"] = e.message
res = loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg]))
out["after_bad_probabilities"] = res["probabilities"].numpy().tolist()
out["variables"] = [name for name, _ in tf.train.list_variables(export_dir + "/variables/variables")]
print(json.dumps(out))
"""


def training_model_logits(model_dir, pixels, domain):
    """The training network (all BN domains) with its EMA weights, float32, read here without advprop_tf's loader."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        model = model_from_config(RunDir(str(model_dir)).read_run_config()["model"])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    ema = ExponentialMovingAverage(model)
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    tf.train.Checkpoint(model=model, ema=ema).read(latest).expect_partial()
    ema.copy_to(model)
    return model(pixels, training=False, domain=domain).numpy()


def read_with_tf_only(export_path, pixels, jpeg, tmp_path):
    np.save(tmp_path / "pixels.npy", pixels)
    (tmp_path / "image.jpg").write_bytes(jpeg)
    result = subprocess.run(
        [sys.executable, "-c", TF_ONLY_READER, export_path, str(tmp_path / "pixels.npy"), str(tmp_path / "image.jpg")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_training_ends_with_an_export_that_tf_alone_can_serve(trained, tmp_path):
    model_dir, trainer = trained
    export_path = str(model_dir / "export" / "1")
    assert trainer.export_path == export_path
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    image = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(image, quality=95).numpy()
    out = read_with_tf_only(export_path, pixels, jpeg, tmp_path)

    sig = out["signatures"]
    assert set(sig) == {"serving_default", "predict_pixels"}
    assert sig["serving_default"]["inputs"] == {"image_bytes": ["string", [None]]}
    assert sig["serving_default"]["outputs"] == {"classes": ["int64", [None]], "probabilities": ["float32", [None, 10]]}
    assert sig["predict_pixels"]["inputs"] == {"pixels": ["float32", [None, 32, 32, 3]]}
    assert sig["predict_pixels"]["outputs"]["logits"] == ["float32", [None, 10]]

    # predict_pixels == the training model, main BN, EMA weights
    np.testing.assert_allclose(out["logits"], training_model_logits(model_dir, pixels, "clean"), atol=1e-5, rtol=1e-5)
    # serving_default on JPEG bytes == predict_pixels on the same image preprocessed in Python
    from advprop_tf.data.preprocessing import preprocess_eval

    preprocessed = preprocess_eval(tf.constant(jpeg), 32).numpy()[None]
    want = read_with_tf_only(export_path, preprocessed, jpeg, tmp_path)["probabilities"][0]
    np.testing.assert_allclose(out["bytes_probabilities"][0], want, atol=1e-4)
    np.testing.assert_allclose(out["bytes_probabilities"][1], want, atol=1e-4)

    # a bad image fails its request with a clear message; the next request is fine
    assert "could not be decoded" in out["bad_error"]
    np.testing.assert_allclose(out["after_bad_probabilities"][0], want, atol=1e-4)

    # no auxiliary BN variable, and exactly the variables of a one-domain network
    names = out["variables"]
    assert not [n for n in names if "adv" in n]
    saved = [n for n in names if "/.ATTRIBUTES/VARIABLE_VALUE" in n and "seed_generator" not in n]
    one_domain = build_efficientnet("efficientnet-b0", num_classes=10, domains=("clean",),
                                    width_coefficient=0.25, depth_coefficient=0.25)
    assert len(saved) == len(one_domain.weights)


def test_assets_describe_the_export(trained):
    model_dir, _ = trained
    assets = model_dir / "export" / "1" / "assets"
    metadata = json.load(open(assets / "metadata.json"))
    assert metadata["model"] == "efficientnet-b0" and metadata["resolution"] == 32
    assert metadata["input_normalization"] == "inception" and metadata["method"] == "advprop"
    assert metadata["domain"] == "clean" and metadata["ema"] is True and metadata["step"] == 4
    labels = (assets / "labels.txt").read_text().split()
    assert labels[:3] == ["disk", "square", "ring"] and len(labels) == 10


def test_adv_domain_export_matches_the_auxiliary_bn(trained, tmp_path):
    model_dir, _ = trained
    path = export(str(model_dir), str(tmp_path / "exports"), domain="adv")
    assert path.endswith("/1")
    assert export(str(model_dir), str(tmp_path / "exports")).endswith("/2")  # next free version
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    loaded = tf.saved_model.load(path)
    got = loaded.signatures["predict_pixels"](pixels=tf.constant(pixels))["logits"].numpy()
    np.testing.assert_allclose(got, training_model_logits(model_dir, pixels, "adv"), atol=1e-5, rtol=1e-5)
    assert not np.allclose(got, training_model_logits(model_dir, pixels, "clean"), atol=1e-3)


def test_tf_servings_view_of_the_export_with_tensorflows_own_tool(trained, tmp_path):
    """saved_model_cli (what TF Serving reads) shows serving_default: image_bytes (string) in, classes and
    probabilities out; a request in TF Serving's REST form, decoded as the server does, run by saved_model_cli,
    gives the classes of the Python API."""
    import base64

    from advprop_tf.serving import rest_request_inputs

    model_dir, _ = trained
    export_path = str(model_dir / "export" / "1")
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run([cli, "show", "--dir", export_path, "--all"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    serving = shown.stdout[shown.stdout.index("signature_def['serving_default']"):]
    serving = serving[:serving.index("Method name is")]
    assert "inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" in serving
    assert "outputs['classes'] tensor_info:\n        dtype: DT_INT64" in serving
    assert "outputs['probabilities'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 10)" in serving
    assert "signature_def['predict_pixels']" in shown.stdout

    rng = np.random.default_rng(2)
    jpegs = [tf.io.encode_jpeg(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).numpy() for _ in range(3)]
    body = json.loads(json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(j).decode()}} for j in jpegs]}))
    inputs = rest_request_inputs(body)
    assert list(inputs) == ["image_bytes"] and list(inputs["image_bytes"]) == jpegs
    np.save(tmp_path / "image_bytes.npy", inputs["image_bytes"], allow_pickle=True)
    ran = subprocess.run([cli, "run", "--dir", export_path, "--tag_set", "serve", "--signature_def", "serving_default",
                          "--inputs", f"image_bytes={tmp_path / 'image_bytes.npy'}", "--outdir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    python_api = tf.saved_model.load(export_path).signatures["serving_default"](image_bytes=tf.constant(jpegs))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "classes.npy"), python_api["classes"].numpy())
    np.testing.assert_allclose(np.load(tmp_path / "out" / "probabilities.npy"), python_api["probabilities"].numpy(),
                               atol=1e-6)
    columnar = rest_request_inputs({"inputs": {"image_bytes": [{"b64": base64.b64encode(j).decode()} for j in jpegs]}})
    assert list(columnar["image_bytes"]) == jpegs


def run_export_cli(*args):
    return subprocess.run([sys.executable, "-m", "advprop_tf.export", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=as_users_run_it())


def run_export_command(args, capsys):
    """`python -m advprop_tf.export <args>` in this process, on fresh flags: its exit status and stderr."""
    from absl import flags

    from advprop_tf import export as export_command

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        export_command.run(flags.FlagValues(), ["advprop_tf.export", *args])
    return exited.value.code, capsys.readouterr().err


def test_bad_requests_exit_2_and_overwrite_nothing(trained, tmp_path, capsys):
    model_dir, _ = trained
    (tmp_path / "empty").mkdir()
    cases = [
        ([f"--model_dir={tmp_path / 'empty'}", f"--export_dir={tmp_path / 'out'}"], "holds no run_config.json"),
        ([f"--model_dir={model_dir}", f"--export_dir={tmp_path / 'out'}", "--domain=robust"], "--domain: unknown domain 'robust'"),
        ([f"--model_dir={model_dir}", f"--export_dir={model_dir / 'export'}", "--version=1"], "already exists"),
    ]
    before = sorted(os.listdir(model_dir / "export" / "1" / "variables"))
    stamp = os.path.getmtime(model_dir / "export" / "1" / "saved_model.pb")
    for args, message in cases:
        code, stderr = run_export_command(args, capsys)
        assert code == 2, stderr[-2000:]
        lines = [l for l in stderr.splitlines() if l.startswith("advprop_tf.export: error:")]
        assert len(lines) == 1 and message in lines[0], stderr[-2000:]
    assert not os.path.exists(tmp_path / "out" / "1")
    assert sorted(os.listdir(model_dir / "export" / "1" / "variables")) == before
    assert os.path.getmtime(model_dir / "export" / "1" / "saved_model.pb") == stamp
    # a model_dir with a run config but no checkpoint; the command itself, as a process
    (tmp_path / "nockpt").mkdir()
    (tmp_path / "nockpt" / "run_config.json").write_text((model_dir / "run_config.json").read_text())
    result = run_export_cli(f"--model_dir={tmp_path / 'nockpt'}")
    assert result.returncode == 2 and "no checkpoint" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("advprop_tf.export: error: --model_dir: ")
