"""tools/compare_methods.py end to end at CI size: methods trained, evaluated, tabled and charted.

One method, the two-stage recipe (the other methods train as the single stages do), keeps the
suite short; vanilla, mixed, adversarial and AdvProp ran end to end in the Imagenette experiment
(docs/imagenette_comparison.md), and each method's objective is tested in test_methods.py.
The runs train a reduced ResNet-50 (5 blocks), which costs less to trace than the reduced EfficientNet
(this file took 126 s alone with it): the tool is the subject here, not the network.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_methods_on_the_synthetic_set(tmp_path):
    overrides = ["--model=resnet-50", "--train_steps=4", "--steps_per_loop=2", "--synthetic_examples=64",
                 "--width_coefficient=0.25", "--depth_coefficient=0.25", "--resolution=32", "--train_batch_size=8",
                 "--eval_batch_size=32", "--export=false"]
    cmd = [sys.executable, "tools/compare_methods.py", "--config=configs/demo.flags",
           *[f"--override={o}" for o in overrides], f"--output_dir={tmp_path}",
           "--corruptions=gaussian_noise,contrast", "--severities=1,5", "--eval_max_batches=1",
           "--eval_batch_size=16", "--methods=adversarial_then_clean"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "comparison.md").read_text()
    assert "| method | clean top-1 | PGD-3 ε=2 acc. | mean ImageNet-C-style corruption acc. | training time | images/s |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["adversarial_then_clean"]
    assert "Command: `python tools/compare_methods.py --config=configs/demo.flags" in table
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.load(open(tmp_path / "comparison.json"))
    for row in summary["rows"]:
        assert row["examples"] == 16
        assert row["pgd_accuracy"] == row["evaluation"]["pgd"]["accuracy"]
        assert row["train_seconds"] > 0 and row["images_per_second"] > 0
        assert set(row["evaluation"]["corruptions"]) == {"gaussian_noise", "contrast"}
    # the paper's fourth baseline: adversarial pre-training (3 of the 4 steps), then clean fine-tuning
    # (1 step) that started from the pre-trained weights
    recipe = tmp_path / "adversarial_then_clean"
    for stage, method, steps in (("pretrain", "adversarial", 3), ("finetune", "vanilla", 1)):
        assert json.load(open(recipe / stage / "run_config.json"))["method"] == method
        assert json.load(open(recipe / stage / "train_stats.json"))["steps"] == steps
    assert "initialized from" in result.stdout + result.stderr
    assert summary["rows"][0]["model_dir"] == str(recipe / "finetune")
    # the table's numbers are those of the evaluate command with the same settings, on the same images
    from absl import flags

    from advprop_tf import evaluate as evaluate_cli

    fv = flags.FlagValues()
    evaluate_cli.define_flags(fv)
    fv(["evaluate", f"--model_dir={recipe / 'finetune'}", "--attack=pgd", "--epsilon=2", "--num_steps=3",
        "--step_size=1", "--targeted=false", "--corruptions=gaussian_noise,contrast", "--severities=1,5",
        "--batch_size=16", "--max_batches=1"])
    direct, _ = evaluate_cli.run(fv, log=lambda line: None)
    row = summary["rows"][0]
    assert direct["examples"] == 16
    assert (row["clean_top_1"], row["pgd_accuracy"], row["mean_corruption_accuracy"]) == (
        direct["clean"]["top_1"], direct["pgd"]["accuracy"], direct["mean_corruption_accuracy"])
    assert row["pgd_accuracy"] <= row["clean_top_1"]  # an untargeted attack from the clean image loses accuracy


def test_compare_methods_names_a_bad_method(tmp_path):
    result = subprocess.run([sys.executable, "tools/compare_methods.py", f"--output_dir={tmp_path}",
                             "--methods=vanilla,madry"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "compare_methods: error: --methods: unknown method 'madry'" in result.stderr


def test_seeds_and_an_equal_time_budget(tmp_path):
    """Each method trains budget / (its measured s/step) steps, once per seed; the table gives mean ± std."""
    overrides = ["--model=resnet-50", "--synthetic_examples=64", "--width_coefficient=0.25",
                 "--depth_coefficient=0.25", "--resolution=32", "--train_batch_size=10", "--eval_batch_size=32",
                 "--export=false", "--steps_per_loop=4"]
    cmd = [sys.executable, "tools/compare_methods.py", "--config=configs/demo.flags",
           *[f"--override={o}" for o in overrides], f"--output_dir={tmp_path}", "--corruptions=contrast",
           "--severities=1", "--eval_max_batches=1", "--eval_batch_size=16", "--methods=vanilla,advprop",
           "--seeds=0,1", "--time_budget_seconds=0.15"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = json.load(open(tmp_path / "comparison.json"))
    summary = {row["method"]: row for row in comparison["summary"]}
    assert summary["vanilla"]["seeds"] == summary["advprop"]["seeds"] == [0, 1]
    # each method trains budget / (its measured s/step) steps: the same budget buys the slower step fewer
    measured = comparison["seconds_per_step"]
    assert set(measured) == {"vanilla", "advprop"} and all(v > 0 for v in measured.values())
    for method in ("vanilla", "advprop"):
        assert summary[method]["train_steps"] == max(1, round(0.15 / measured[method]))
    slower, faster = sorted(measured, key=measured.get, reverse=True)
    assert summary[slower]["train_steps"] <= summary[faster]["train_steps"]
    for method in ("vanilla", "advprop"):
        for seed in (0, 1):
            stats = json.load(open(tmp_path / f"seed{seed}" / method / "train_stats.json"))
            assert stats["steps"] == summary[method]["train_steps"] and stats["finished"]
    assert summary["vanilla"]["clean_top_1_std"] is not None
    table = (tmp_path / "comparison.md").read_text()
    assert "same training budget of 0.15 s" in table and "Seeds 0, 1: mean ± sample std." in table
    row = next(line for line in table.splitlines() if line.startswith("| advprop |"))
    assert row.count(" ± ") == 3 and f"| {summary['advprop']['train_steps']} |" in row


def test_runs_through_several_bns_and_a_sweep_of_variants(tmp_path):
    """--eval_domains evaluates one run through each BN it has (one row each); --variant trains the methods
    once per network variant into its own directory and plots accuracy against the variants."""
    overrides = ["--model=resnet-50", "--train_steps=3", "--steps_per_loop=3", "--synthetic_examples=64",
                 "--width_coefficient=0.25", "--resolution=32", "--train_batch_size=8", "--eval_batch_size=32",
                 "--export=false", "--optimizer=sgd", "--base_learning_rate=0.5"]
    cmd = [sys.executable, "tools/compare_methods.py", "--config=configs/demo.flags",
           *[f"--override={o}" for o in overrides], f"--output_dir={tmp_path}", "--corruptions=",
           "--eval_max_batches=1", "--eval_batch_size=16", "--methods=advprop", "--eval_domains=clean,adv,adv2",
           "--variant=shallow:--depth_coefficient=0.25", "--variant=deep:--depth_coefficient=0.5"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(tmp_path / "comparison.json"))
    labels = [row["label"] for row in summary["rows"]]
    # through each asked BN the run has (it has no adv2)
    assert labels == ["shallow: advprop, clean BN", "shallow: advprop, adv BN",
                      "deep: advprop, clean BN", "deep: advprop, adv BN"]
    table = (tmp_path / "comparison.md").read_text()
    assert "| deep: advprop, adv BN |" in table
    for row in summary["rows"]:
        assert row["evaluation"]["classifier"]["domain"] == row["domain"]
        assert row["model_dir"] == str(tmp_path / row["variant"] / row["method"])
        config = json.load(open(os.path.join(row["model_dir"], "run_config.json")))
        assert config["model"]["depth_coefficient"] == {"shallow": 0.25, "deep": 0.5}[row["variant"]]
    assert {"evaluation_adv.json", "evaluation_clean.json"} <= set(os.listdir(tmp_path / "deep" / "advprop"))
    assert (tmp_path / "variant.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_malformed_variant_is_named(tmp_path):
    result = subprocess.run([sys.executable, "tools/compare_methods.py", f"--output_dir={tmp_path}",
                             "--variant=--depth_coefficient=0.5"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "compare_methods: error: --variant: '--depth_coefficient=0.5' is not 'label:--flag=value" in result.stderr
