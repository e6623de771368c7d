"""Evaluation suite: accuracy arithmetic, PGD and corruption robustness, mCE, SavedModel = model_dir, CLI errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from advprop_tf import evaluate as evaluate_cli
from advprop_tf.errors import ConfigError
from advprop_tf.data.corruptions import CORRUPTIONS, corrupt
from advprop_tf.evaluation import (
    Classifier,
    EvaluationError,
    corruption_errors,
    evaluate,
    restrict_to_labels,
    subset_label_map,
    topk_counts,
)
from advprop_tf.attacks.pgd import AttackConfig
from advprop_tf.serving import export
from tests.helpers import as_users_run_it, synthetic_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CENTERS = np.arange(10, dtype=np.float32) * 25 + 5  # class c <=> mean pixel near 25c + 5


def brightness_classifier():
    """Hand-made differentiable classifier: the class whose centre is nearest the image's mean pixel."""
    centers = tf.constant(CENTERS)

    def logits_fn(x):
        mean = tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2, 3])
        return -tf.square(mean[:, None] - centers[None]) / 200.0

    return Classifier(logits_fn, 8, 10, {"kind": "hand-made"})


def constant_images(means, labels, batch_size=4):
    images = np.ones((len(means), 8, 8, 3), np.float32) * np.asarray(means, np.float32)[:, None, None, None]
    return tf.data.Dataset.from_tensor_slices((images, np.asarray(labels, np.int32))).batch(batch_size)


def test_topk_counts_on_a_hand_made_batch():
    logits = tf.constant([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 5, 4, 3, 2, 1], [1, 0, 0, 0, 0, 0]])
    labels = tf.constant([0, 1, 1, -1])  # top-1 hit; rank 5 of 6; top-1 hit; padding
    np.testing.assert_array_equal(topk_counts(logits, labels, 2).numpy(), [2, 2, 3])
    np.testing.assert_array_equal(topk_counts(logits, labels, 5).numpy(), [2, 3, 3])


def test_evaluate_known_accuracy_and_pgd_at_epsilon_zero():
    # 10 images: 7 near their class centre, 3 near a wrong one (labels 0..8 only).
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]
    means = [CENTERS[label] + 3 for label in labels]
    means[2], means[5], means[9] = CENTERS[3] + 3, CENTERS[7] + 3, CENTERS[1] + 3
    classifier = brightness_classifier()
    results = evaluate(classifier, constant_images(means, labels),
                       attack=AttackConfig(epsilon=0.0, num_steps=1, step_size=1.0, targeted=False))
    assert results["examples"] == 10
    assert results["clean"]["top_1"] == pytest.approx(0.7)
    assert results["clean"]["top_5"] == pytest.approx(0.9)  # only the 8 shown as a 1 is outside the top 5
    assert results["pgd"]["accuracy"] == pytest.approx(results["clean"]["top_1"])


def test_pgd_evaluation_attacks_the_evaluated_network():
    labels = list(range(9))
    means = [CENTERS[label] + 3 for label in labels]
    classifier = brightness_classifier()
    clean = evaluate(classifier, constant_images(means, labels))["clean"]["top_1"]
    attacked = evaluate(classifier, constant_images(means, labels),
                        attack=AttackConfig(epsilon=30.0, num_steps=3, step_size=10.0, targeted=False))
    assert clean == 1.0
    assert attacked["pgd"]["accuracy"] <= 0.2
    assert attacked["pgd"]["error_rate"] == pytest.approx(1 - attacked["pgd"]["accuracy"])
    targeted = evaluate(classifier, constant_images(means, labels), seed=3,
                        attack=AttackConfig(epsilon=255.0, num_steps=60, step_size=5.0, targeted=True))
    # With an unbounded budget every target is reachable: the attack lands on it.
    assert targeted["pgd"]["target_success_rate"] == pytest.approx(1.0)
    assert targeted["pgd"]["accuracy"] == 0.0


def smooth_images(size=64, n=4, seed=0):
    rng = np.random.default_rng(seed)
    low = tf.image.resize(rng.uniform(0, 255, (n, 8, 8, 3)).astype(np.float32), [size, size], "bicubic")
    return tf.clip_by_value(low + rng.normal(0, 10, (n, size, size, 3)).astype(np.float32), 0, 255)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_grows_with_severity_and_is_seeded(name):
    clean = smooth_images()
    distances = []
    for severity in range(1, 6):
        out = corrupt(clean, name, severity, seed=(1, 2))
        assert out.shape == clean.shape and out.dtype == tf.float32
        assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0
        distances.append(float(tf.sqrt(tf.reduce_mean(tf.square(out - clean)))))
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert distances[0] > 0.0
    again = corrupt(clean, name, 3, seed=(1, 2))
    np.testing.assert_array_equal(again.numpy(), corrupt(clean, name, 3, seed=(1, 2)).numpy())


def test_noise_depends_on_the_seed_and_bad_arguments_are_named():
    clean = smooth_images()
    a = corrupt(clean, "gaussian_noise", 2, seed=(1, 2)).numpy()
    b = corrupt(clean, "gaussian_noise", 2, seed=(1, 3)).numpy()
    assert np.abs(a - b).mean() > 1.0
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(clean, "fog", 1)
    for severity in (0, 6):
        with pytest.raises(ValueError, match=f"severity {severity} is outside 1..5"):
            corrupt(clean, "contrast", severity)


def test_mce_arithmetic_on_hand_made_numbers():
    ours = {"corruptions": {"a": {"accuracy": {"1": 0.8, "2": 0.6}}, "b": {"accuracy": {"1": 0.5, "2": 0.5}}}}
    reference = {"corruptions": {"a": {"accuracy": {"1": 0.6, "2": 0.2}}, "b": {"accuracy": {"1": 0.5, "2": 0.5}}}}
    result = corruption_errors(ours, reference)
    # a: errors 0.2 + 0.4 = 0.6 vs 0.4 + 0.8 = 1.2 -> 50; b: 1.0 vs 1.0 -> 100; mean 75.
    assert result["corruption_error"] == pytest.approx({"a": 50.0, "b": 100.0})
    assert result["mce"] == pytest.approx(75.0)
    with pytest.raises(EvaluationError, match="no result for corruption 'a'"):
        corruption_errors(ours, {"corruptions": {"b": reference["corruptions"]["b"]}})


def test_label_subset_maps_logits_and_labels():
    subset = [7, 2, 5]
    classifier = Classifier(lambda x: tf.constant([[0.0, 0, 9, 0, 0, 1, 0, 3]]), 8, 8, {})
    restricted = restrict_to_labels(classifier, subset)
    np.testing.assert_array_equal(restricted.logits_fn(None).numpy(), [[9.0, 1.0, 3.0]])
    np.testing.assert_array_equal(subset_label_map(subset)(tf.constant([2, 5, 7, 3, -1])).numpy(), [0, 1, 2, -1, -1])


def cli_flags(*args):
    fv = flags.FlagValues()
    evaluate_cli.define_flags(fv)
    fv(["evaluate", *args])
    return fv


def test_saved_model_and_its_model_dir_give_the_same_accuracy(trained, tmp_path):
    model_dir, _ = trained
    path = export(str(model_dir), str(tmp_path / "export"))
    from_dir, _ = evaluate_cli.run(cli_flags(f"--model_dir={model_dir}", f"--output={tmp_path / 'a.json'}"),
                                   log=lambda line: None)
    from_export, output = evaluate_cli.run(
        cli_flags(f"--saved_model={path}", "--dataset=synthetic", "--synthetic_examples=128",
                  f"--output={tmp_path / 'b.json'}"), log=lambda line: None)
    assert from_dir["examples"] == from_export["examples"] == 200
    assert from_dir["clean"] == pytest.approx(from_export["clean"], abs=1e-9)
    assert json.load(open(output))["clean"] == from_export["clean"]
    adv, _ = evaluate_cli.run(cli_flags(f"--model_dir={model_dir}", "--domain=adv", "--max_batches=1",
                                        f"--output={tmp_path / 'c.json'}"), log=lambda line: None)
    assert adv["classifier"]["domain"] == "adv" and adv["examples"] == 64


@pytest.mark.parametrize("args, message", [
    (["--corruptions=contrast,fog"], "--corruptions: unknown corruption 'fog'"),
    (["--severities=0,1"], "--severities: severity 0 is outside 1..5"),
    (["--severities=6"], "--severities: severity 6 is outside 1..5"),
    (["--domain=robust"], "--domain: unknown domain 'robust'"),
    (["--dataset=imagenet"], "--dataset: unknown data source 'imagenet'"),
])
def test_bad_flags_are_named(trained, args, message):
    model_dir, _ = trained
    with pytest.raises(ConfigError) as error:  # UsageError, EvaluationError: the library names the field
        evaluate_cli.run(cli_flags(f"--model_dir={model_dir}", *args), log=lambda line: None)
    assert f"--{error.value.field}: {error.value.reason}".startswith(message)  # as the CLI prints it


def test_cli_without_checkpoint_exits_2_with_one_line(tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({"model": {}}))
    result = subprocess.run([sys.executable, "-m", "advprop_tf.evaluate", f"--model_dir={tmp_path}"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("advprop_tf.evaluate: error:")]
    assert lines == [f"advprop_tf.evaluate: error: --model_dir: no checkpoint in '{tmp_path}/checkpoints'"]
    assert "Traceback" not in result.stderr


def test_a_folder_made_for_evaluation_is_evaluated_whole_without_split_flags(trained, tmp_path):
    model_dir, _ = trained
    rng = np.random.default_rng(0)
    for index in range(5):
        folder = tmp_path / "eval_images" / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        tf.io.write_file(str(folder / f"{index}.jpg"), tf.io.encode_jpeg(image))
    results, _ = evaluate_cli.run(cli_flags(f"--model_dir={model_dir}", f"--dataset=folder:{tmp_path / 'eval_images'}",
                                            f"--output={tmp_path / 'f.json'}"), log=lambda line: None)
    assert results["examples"] == 5


def test_the_imagecorruptions_backend_gives_the_papers_mce_over_15_by_5(trained, tmp_path):
    model_dir, _ = trained
    results, _ = evaluate_cli.run(cli_flags(
        f"--model_dir={model_dir}", "--corruption_backend=imagecorruptions", "--corruptions=all",
        "--max_batches=1", "--batch_size=2", f"--output={tmp_path / 'c.json'}"), log=lambda line: None)
    assert results["corruption_backend"] == "imagecorruptions" and len(results["corruptions"]) == 15
    assert results["mce"]["reference"].startswith("AlexNet")
    errors = {n: sum(1 - a for a in v["accuracy"].values()) for n, v in results["corruptions"].items()}
    assert results["mce"]["corruption_error"]["fog"] == pytest.approx(100 * errors["fog"] / (5 * 0.819324))
    assert "ImageNet-C (imagecorruptions)" in evaluation_table(results)


def evaluation_table(results):
    from advprop_tf.evaluation import results_table

    return results_table(results)


def test_the_tfds_backend_evaluates_each_prepared_corrupted_dataset(trained, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    model_dir, _ = trained
    opened = []
    real = evaluate_cli._tfds_source

    def recording(name, severity, data_dir):
        opened.append((name, severity))
        return real(name, severity, data_dir)

    monkeypatch.setattr(evaluate_cli, "_tfds_source", recording)
    import advprop_tf.data.pipeline as pipeline

    crops = []
    real_eval_dataset = pipeline.eval_dataset
    monkeypatch.setattr(pipeline, "eval_dataset", lambda *a, **k: crops.append(k["crop"]) or real_eval_dataset(*a, **k))
    with tfds.testing.mock_data(num_examples=4):
        results, _ = evaluate_cli.run(cli_flags(
            f"--model_dir={model_dir}", "--corruption_backend=tfds", "--corruptions=gaussian_noise,contrast",
            "--severities=1,5", "--batch_size=4", f"--output={tmp_path / 't.json'}"), log=lambda line: None)
    assert opened == [("gaussian_noise", 1), ("gaussian_noise", 5), ("contrast", 1), ("contrast", 5)]
    # the clean validation split gets the center crop; ImageNet-C's already-cropped images are only resized
    assert crops == ["center"] + ["none"] * 4 and results["eval_crop"] == "center"
    assert set(results["corruptions"]) == {"gaussian_noise", "contrast"}
    assert all(0 <= a <= 1 for v in results["corruptions"].values() for a in v["accuracy"].values())
    assert "mce" not in results  # 2 of 15 corruptions: no mCE is claimed


def test_the_evaluate_command_as_a_user_runs_it_gives_the_librarys_numbers(trained, tmp_path):
    """`python -m advprop_tf.evaluate` in its own process with Grappler's rewrites on (as users run it; the
    in-process tests run without them): clean and PGD accuracy equal the library's on the same images."""
    model_dir, _ = trained
    args = [f"--model_dir={model_dir}", "--attack=pgd", "--epsilon=2", "--num_steps=2", "--max_batches=2",
            "--batch_size=32"]
    result = subprocess.run([sys.executable, "-m", "advprop_tf.evaluate", *args, f"--output={tmp_path / 'cli.json'}"],
                            capture_output=True, text=True, cwd=REPO, env=as_users_run_it(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from_cli = json.load(open(tmp_path / "cli.json"))
    in_process, _ = evaluate_cli.run(cli_flags(*args, f"--output={tmp_path / 'lib.json'}"), log=lambda line: None)
    assert from_cli["examples"] == in_process["examples"] == 64
    assert from_cli["clean"] == pytest.approx(in_process["clean"], abs=1e-9)
    assert from_cli["pgd"]["accuracy"] == pytest.approx(in_process["pgd"]["accuracy"], abs=1e-9)


def test_pgd_restarts_take_the_per_image_worst_case_and_batch_statistics_are_an_evaluation_mode(trained, tmp_path):
    """Each restart starts at its own random point: robust accuracy over 3 restarts is at most that of each
    restart alone (the same seeds); --bn_mode=batch evaluates with each batch's own statistics (another function:
    other logits)."""
    from advprop_tf.evaluation import classifier_from_model_dir
    from advprop_tf.evaluation.loop import RESTART_STREAM, attack_measure
    from advprop_tf.randomness import fold_in

    model_dir, _ = trained
    classifier = classifier_from_model_dir(str(model_dir))
    x, y = next(iter(synthetic_batches(32, split="validation", num_examples=64)))
    attack = AttackConfig(epsilon=4, num_steps=2, step_size=2, targeted=False, random_start=True)
    seed = tf.constant([0, 5], tf.int32)
    worst = attack_measure(classifier, attack, restarts=3)(x, y, seed).numpy()
    single = [attack_measure(classifier, attack)(x, y, fold_in(seed, RESTART_STREAM + r)).numpy() for r in range(3)]
    assert worst[0] <= min(s[0] for s in single) and worst[0] + worst[1] == 32
    results, _ = evaluate_cli.run(cli_flags(f"--model_dir={model_dir}", "--attack=pgd", "--epsilon=4", "--num_steps=2",
                                            "--step_size=2", "--restarts=3", "--max_batches=1", "--batch_size=32",
                                            f"--output={tmp_path / 'r.json'}"), log=lambda line: None)
    assert results["pgd"]["restarts"] == 3 and results["pgd"]["random_start"]
    batch = classifier_from_model_dir(str(model_dir), bn_mode="batch")
    assert not np.allclose(batch.logits_fn(x).numpy(), classifier.logits_fn(x).numpy(), atol=1e-3)
    batch_run, _ = evaluate_cli.run(cli_flags(f"--model_dir={model_dir}", "--bn_mode=batch", "--batch_size=40",
                                              f"--output={tmp_path / 'b.json'}"), log=lambda line: None)
    assert batch_run["examples"] == 200 and batch_run["classifier"]["bn_mode"] == "batch"  # every image, once
    from advprop_tf.data.pipeline import eval_dataset
    from advprop_tf.data.sources import parse_source

    source = parse_source("synthetic", None, 10, 0.0, synthetic_size=37, synthetic_examples=128, seed=0)
    in_order, shuffled = ([int(v) for _, y in eval_dataset(source, 32, 40, shuffle_seed=seed) for v in y]
                          for seed in (None, 0))
    assert sorted(in_order) == sorted(shuffled) and in_order != shuffled
    with pytest.raises(ConfigError, match="restarts: needs --attack=pgd"):
        evaluate_cli.run(cli_flags(f"--model_dir={model_dir}", "--restarts=2"), log=lambda line: None)
