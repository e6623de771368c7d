"""Train vanilla, mixed, adversarial, AdvProp, Fast AdvProp and adversarial-then-clean from one config,
compare them.

  python tools/compare_methods.py --config=configs/imagenette.flags \
      --override=--dataset=folder:../shared/data/imagenette-train --override=--train_epochs=3 \
      --output_dir=runs/compare --eval_epsilon=2 --corruptions=all --severities=1,3,5

Each method trains (in this process, one after the other) into <output_dir>/<method>
with the config plus the overrides; a method whose directory already holds a
finished run (train_stats.json at the final step) is not trained again, so an
interrupted comparison resumes, and --model_dirs=method=dir,... takes existing runs.
adversarial_then_clean is the paper's fourth baseline (Sec. 3, Fig. 2): adversarial
pre-training for (1 - --finetune_fraction) of the training length into <method>/pretrain,
then clean (vanilla) fine-tuning from its weights for the rest into <method>/finetune.
Every run is then measured by advprop_tf.evaluate (EMA weights, main BN) on its
validation split: clean top-1, PGD accuracy, mean corruption accuracy. Writes
<output_dir>/comparison.md (table), comparison.json and comparison.png (chart,
when matplotlib is installed).

--seeds=0,1,2 trains every method once per seed into <output_dir>/seed<k>/<method>
and tables mean ± std. --time_budget_seconds=S gives every method the same
wall-clock budget: each method's seconds per step is measured first (all methods
interleaved in this process, random batches of the config's size), then each trains
S / (s/step) steps. The runs are fixed-length from then on, so a busy machine
stretches the wall time but does not change what is compared.

--eval_domains=clean,adv evaluates every run through each of those BNs it has (AdvProp's
adversarial BN is the robust network of "Intriguing Properties of Adversarial Training at
Scale"), one row each. --variant='label:--flag=value ...' (repeatable) trains every method
once per network variant, into <output_dir>/<label>/..., and plots accuracy against the
variants (variant.png): a depth sweep is --variant=resnet-14:--depth_coefficient=0.17
--variant=resnet-29:--depth_coefficient=0.34 (docs/intriguing_properties.md).
"""

from __future__ import annotations

import io
import os
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from advprop_tf.domains import CLEAN_IMAGES  # noqa: E402

METHODS = ("vanilla", "mixed", "adversarial", "advprop", "fast_advprop", "adversarial_then_clean")
# A recipe: (training method, share of the training length) per stage, each from the previous one's weights.
RECIPES = {"adversarial_then_clean": ("adversarial", "vanilla")}

flags.DEFINE_string("config", None, "Base training flagfile (configs/*.flags).")
flags.DEFINE_multi_string("override", [], "A training flag overriding the config, e.g. --override=--train_steps=100.")
flags.DEFINE_string("output_dir", None, "Where each method's run and the comparison go.")
flags.DEFINE_list("methods", list(METHODS), "Methods to compare.")
flags.DEFINE_list("model_dirs", [], "Existing runs to use instead of training: method=dir,...")
flags.DEFINE_float("eval_epsilon", 2.0, "PGD epsilon (pixels) of the robustness evaluation.")
flags.DEFINE_integer("eval_num_steps", None, "PGD iterations (default: epsilon+1, 1 for epsilon 1).")
flags.DEFINE_float("eval_step_size", 1.0, "PGD step in pixels.")
flags.DEFINE_integer("eval_restarts", 1, "PGD restarts of the evaluation, each from a random start (the per-image "
                     "worst case counts).")
flags.DEFINE_bool("eval_targeted", False, "Targeted PGD in the evaluation (default: untargeted, the harder test).")
flags.DEFINE_string("corruptions", "all", "Corruptions of the evaluation (all or names).")
flags.DEFINE_list("severities", ["1", "2", "3", "4", "5"], "Corruption severities.")
flags.DEFINE_integer("eval_batch_size", 64, "Evaluation batch.")
flags.DEFINE_integer("eval_max_batches", 0, "Evaluate only this many batches (0: the whole split).")
flags.DEFINE_float("finetune_fraction", 0.25, "adversarial_then_clean: the share of the training length "
                   "spent on clean fine-tuning.")
flags.DEFINE_list("seeds", [], "Train every method once per seed, in <output_dir>/seed<k>/<method>; the table "
                  "gives mean ± std. Default: the config's seed, one run per method in <output_dir>/<method>.")
flags.DEFINE_list("eval_domains", [], "Evaluate every run through each of these BN domains it has (e.g. "
                  "clean,adv: AdvProp through its main and its adversarial BN), one table row each. "
                  "Default: the main BN only.")
flags.DEFINE_multi_string("variant", [], "A network variant to train every method on, as "
                          "'label:--flag=value --flag=value' (e.g. 'resnet-14:--depth_coefficient=0.17'); each "
                          "trains into <output_dir>/<label>/..., the table has a row per variant, and "
                          "variant.png plots accuracy against the variants in the given order.")
flags.DEFINE_float("time_budget_seconds", 0.0, "The same wall-clock training budget for every method: its "
                   "s/step is measured first, then it trains budget / (s/step) steps. 0: the config's length.")
FLAGS = flags.FLAGS


class CompareError(ValueError):
    """A bad flag of the comparison; the message names it."""


class Interrupted(RuntimeError):
    """A training run stopped on SIGTERM after saving."""


def training_flags(config, overrides, method, model_dir):
    """The parsed, validated training flags of one method's run."""
    from advprop_tf import train_flags
    from advprop_tf.errors import ConfigError

    fv = flags.FlagValues()
    train_flags.define_train_flags(fv)
    argv = ["train"] + ([f"--flagfile={config}"] if config else []) + list(overrides)
    argv += [f"--method={method}", f"--model_dir={model_dir}"]
    try:
        fv(argv)
        return train_flags.config_from_flags(fv)
    except flags.Error as e:
        raise CompareError(f"training flags for {method}: {str(e).splitlines()[0]}") from None
    except ConfigError as e:
        raise CompareError(f"training flags for {method}: {train_flags.flag_error(e)}") from None


def recipe_stages(config, overrides, recipe, model_dir):
    """The configs of a recipe's stages: the training length split by --finetune_fraction, each
    stage initialized from the previous one's run directory."""
    from advprop_tf.paths import join

    first, second = RECIPES[recipe]
    pretrain = training_flags(config, overrides, first, join(model_dir, "pretrain"))
    finetune = training_flags(config, overrides, second, join(model_dir, "finetune"))
    steps, epochs = pretrain.optimization.train_steps, pretrain.optimization.train_epochs
    if steps:
        tuned = max(1, int(round(steps * FLAGS.finetune_fraction)))
        pretrain = pretrain.replace(optimization={"train_steps": max(1, steps - tuned)})
        finetune = finetune.replace(optimization={"train_steps": tuned})
    else:
        pretrain = pretrain.replace(optimization={"train_epochs": epochs * (1 - FLAGS.finetune_fraction)})
        finetune = finetune.replace(optimization={"train_epochs": epochs * FLAGS.finetune_fraction})
    # exists once the first stage has trained
    return [pretrain, finetune.replace(run={"init_checkpoint": pretrain.run.model_dir})]


def finished(model_dir):
    """The train_stats of a finished run in `model_dir`, else None."""
    from advprop_tf.training.run_dir import RunDir

    stats = RunDir(model_dir).read_stats()
    return stats if stats.get("finished") else None


def train(method, cfg):
    """Train one method (or reuse its finished run); returns its train_stats."""
    import keras

    from advprop_tf.training.loop import Trainer

    stats = finished(cfg.run.model_dir)
    if stats is not None:
        print(f"[{method}] already trained in {cfg.run.model_dir}: reusing it", flush=True)
        return stats
    print(f"[{method}] training into {cfg.run.model_dir}", flush=True)
    trainer = Trainer(cfg)
    if trainer.run() is None and not finished(cfg.run.model_dir):
        # SIGTERM: the run saved a checkpoint; a rerun of this command resumes it.
        raise Interrupted(f"{method} was interrupted at step {trainer.train_step.current_step}; "
                          "run the same command again to resume")
    keras.mixed_precision.set_global_policy("float32")  # a config may have changed it
    return trainer.run_dir.read_stats()


def combined(stage_stats):
    """Training time and throughput of all of a method's stages together."""
    seconds = sum(s["train_seconds"] for s in stage_stats)
    images = sum(s["train_seconds"] * (s["images_per_second"] or 0.0) for s in stage_stats)
    return {"train_seconds": seconds, "images_per_second": images / seconds if seconds else None}


def measure(method, model_dir, domain):
    from advprop_tf import evaluate as evaluate_cli

    fv = flags.FlagValues()
    evaluate_cli.define_flags(fv)
    args = [f"--model_dir={model_dir}", f"--domain={domain}", "--attack=pgd", f"--epsilon={FLAGS.eval_epsilon}",
            f"--step_size={FLAGS.eval_step_size}", f"--targeted={FLAGS.eval_targeted}",
            f"--corruptions={FLAGS.corruptions}", f"--severities={','.join(FLAGS.severities)}",
            f"--batch_size={FLAGS.eval_batch_size}", f"--max_batches={FLAGS.eval_max_batches}",
            f"--restarts={FLAGS.eval_restarts}"]
    if FLAGS.eval_num_steps:
        args.append(f"--num_steps={FLAGS.eval_num_steps}")
    fv(["evaluate", *args])
    results, _ = evaluate_cli.run(fv, log=lambda line: print(f"[{method} {domain} BN] {line}", flush=True))
    return results


def markdown_table(rows, pgd_label):
    lines = ["| method | clean top-1 | " + pgd_label + " | mean ImageNet-C-style corruption acc. | training time | images/s |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        minutes = row["train_seconds"] / 60
        rate = f"{row['images_per_second']:.1f}" if row["images_per_second"] else "n/a"
        corruption = row.get("mean_corruption_accuracy")
        lines.append(
            f"| {row['label']} | {row['clean_top_1']:.4f} | {row['pgd_accuracy']:.4f} | "
            + (f"{corruption:.4f}" if corruption is not None else "n/a")
            + f" | {minutes:.1f} min | {rate} |"
        )
    return "\n".join(lines)


def save_figure(fig, path):
    """A matplotlib figure as PNG at `path` on any filesystem (gs:// included)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())


def write_chart(rows, path, pgd_label, seed_rows=None):
    """Grouped bars: clean, PGD and mean corruption accuracy per method (metrics that were not measured left
    out); with `seed_rows` (several seeds) the bars are the means and each seed's value is a dot on its bar.
    Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    metrics = [(key, label) for key, label in (("clean_top_1", "clean top-1"), ("pgd_accuracy", pgd_label),
                                                ("mean_corruption_accuracy", "mean ImageNet-C-style corruption acc."))
               if any(row.get(key) is not None for row in rows)]
    x = np.arange(len(rows))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, (key, label) in enumerate(metrics):
        offset = x + (i - (len(metrics) - 1) / 2) * width
        values = [row.get(key) or 0.0 for row in rows]
        bars = ax.bar(offset, values, width, label=label + (" (mean; dots: seeds)" if seed_rows else ""))
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        for position, row in zip(offset, rows):
            seeds = [r[key] for r in seed_rows or () if r["label"] == row["label"] and r.get(key) is not None]
            ax.scatter([position] * len(seeds), seeds, s=9, color="black", zorder=3)
    ax.set_xticks(x, [row["label"] for row in rows], rotation=20 if len(rows) > 4 else 0, fontsize=7)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Training methods compared" + (f" ({len({r['seed'] for r in seed_rows})} seeds)" if seed_rows else ""))
    save_figure(fig, path)
    return True


def write_variant_chart(summary, path, pgd_label, variants):
    """Clean top-1 (dashed) and PGD accuracy (solid) of each method and BN against the variants, in the
    given order (a depth sweep: shallow to deep); error bars are the std over seeds. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    series = dict.fromkeys((row["method"], row["domain"]) for row in summary)
    for i, (method, domain) in enumerate(series):
        mine = {row["variant"]: row for row in summary if (row["method"], row["domain"]) == (method, domain)}
        x = [k for k, v in enumerate(variants) if v in mine]
        name = f"{method}, {domain} BN" if FLAGS.eval_domains else method
        for key, style, what in (("pgd_accuracy", "-o", pgd_label), ("clean_top_1", "--s", "clean top-1")):
            rows = [mine[variants[k]] for k in x]
            ax.errorbar(x, [r[key] for r in rows], yerr=[r[key + "_std"] or 0.0 for r in rows], fmt=style,
                        color=f"C{i}", capsize=3, label=f"{name}: {what}")
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.set_title("Accuracy against the network variant")
    save_figure(fig, path)
    return True


def stage_key(method, configs, i):
    """(method, stage index) for a recipe's stages, (method, None) for a single-stage method."""
    return method, None if len(configs) == 1 else i


def calibrate(stages):
    """Seconds per training step of each stage config (by stage_key): all timed interleaved in this process on
    random batches of the config's batch size and resolution (the input pipeline is not the bottleneck)."""
    from advprop_tf.benchmarking import time_interleaved
    from advprop_tf.training import builders

    runs = {}
    for key, cfg in ((stage_key(m, c, i), cfg) for m, c in stages.items() for i, cfg in enumerate(c)):
        source = builders.build_source(cfg)
        num_classes = builders.model_num_classes(cfg, source)
        length = builders.training_length(cfg, source)
        model = builders.build_model(cfg, num_classes)
        _, optimizer, ema = builders.build_optimization(cfg, model, length)
        step = builders.build_train_step(cfg, model, optimizer, ema, tf.distribute.get_strategy(),
                                         num_classes=num_classes, total_steps=length.total_steps, seed=0)
        size = model.resolution
        batch = builders.images_per_replica(cfg)  # what one step reads (fast_advprop: attacked images on top)
        pixels = tf.random.uniform([batch, size, size, 3], 0, 255)
        labels = tf.random.uniform([batch], 0, num_classes, tf.int32)
        runs[key] = lambda step=step, pixels=pixels, labels=labels: step.run_batch(pixels, labels)["loss"]
    seconds = time_interleaved(runs, warmup=3, rounds=5, steps=4)
    for key, value in seconds.items():
        print(f"[calibration] {key[0]}{'' if key[1] is None else f' stage {key[1]}'}: {value:.3f} s/step", flush=True)
    return seconds


def apply_budget(stages, seconds_per_step, budget):
    """Set train_steps so that every method's stages together take `budget` seconds."""
    for method, configs in stages.items():
        shares = [1.0] if len(configs) == 1 else [1.0 - FLAGS.finetune_fraction, FLAGS.finetune_fraction]
        for i, (cfg, share) in enumerate(zip(configs, shares)):
            steps = max(1, int(round(share * budget / seconds_per_step[stage_key(method, configs, i)])))
            configs[i] = cfg.replace(optimization={"train_steps": steps})


def parse_variants(values):
    """--variant values as {label: [training flags]} in the given order ({None: []} without any)."""
    variants = {}
    for value in values:
        label, _, overrides = value.partition(":")
        label = label.strip()
        if not label or "/" in label or not overrides.strip() or label in variants:
            raise CompareError(f"--variant: {value!r} is not 'label:--flag=value ...' with a new label "
                               "(no '/')")
        variants[label] = shlex.split(overrides)
    return variants or {None: []}


def plan(seed, existing, variant=None, variant_overrides=()):
    """The validated configs of every method's stages for one seed (None: the config's own) and variant."""
    from advprop_tf.paths import join

    base = FLAGS.output_dir if variant is None else join(FLAGS.output_dir, variant)
    base = base if seed is None else join(base, f"seed{seed}")
    overrides = list(FLAGS.override) + list(variant_overrides) + ([] if seed is None else [f"--seed={seed}"])
    stages = {}
    for m in FLAGS.methods:
        model_dir = existing.get(m, join(base, m))
        if m in RECIPES and m not in existing:
            stages[m] = recipe_stages(FLAGS.config, overrides, m, model_dir)
        else:
            stages[m] = [training_flags(FLAGS.config, overrides, RECIPES.get(m, (m,))[-1], model_dir)]
    return stages


def evaluated_domains(cfg):
    """The --eval_domains that the run's network has; its main BN when it has none of them."""
    spec = cfg.method.domains
    return [d for d in FLAGS.eval_domains if d in spec.names] or [spec.main]


def row_label(variant, method, domain):
    label = f"{method}, {domain} BN" if FLAGS.eval_domains else method
    return label if variant is None else f"{variant}: {label}"


def run_method(method, configs, existing, variant=None):
    """Train (or reuse) one method's stages and evaluate its final run through each evaluated BN:
    the comparison's rows for it."""
    from advprop_tf.training.run_dir import RunDir

    cfg = configs[-1]
    if method in existing and not RunDir(cfg.run.model_dir).read_stats():
        stats = {"train_seconds": 0.0, "images_per_second": None}
    else:
        stats = combined([train(f"{method}:{c.method.method}" if len(configs) > 1 else method, c) for c in configs])
    rows = []
    for domain in evaluated_domains(cfg):
        results = measure(method, cfg.run.model_dir, domain)
        clean = results[CLEAN_IMAGES]
        rows.append({
            "label": row_label(variant, method, domain), "method": method, "domain": domain, "variant": variant,
            "model_dir": cfg.run.model_dir, "seed": cfg.run.seed, "clean_top_1": clean["top_1"],
            "clean_top_5": clean["top_5"], "pgd_accuracy": results["pgd"]["accuracy"],
            "mean_corruption_accuracy": results.get("mean_corruption_accuracy"),
            "train_steps": sum(c.optimization.train_steps or 0 for c in configs) or None,
            "train_seconds": stats["train_seconds"], "images_per_second": stats["images_per_second"],
            "examples": results["examples"], "evaluation": results,
        })
    return rows


METRICS = ("clean_top_1", "pgd_accuracy", "mean_corruption_accuracy", "train_seconds", "images_per_second")


def summarize(rows):
    """One row per method: the mean of each metric over seeds, and its sample std (`<metric>_std`)."""
    import numpy as np

    summary = []
    for label in dict.fromkeys(row["label"] for row in rows):
        mine = [row for row in rows if row["label"] == label]
        out = {key: mine[0][key] for key in ("label", "method", "domain", "variant", "train_steps")}
        out["seeds"] = [row["seed"] for row in mine]
        for key in METRICS:
            values = [row[key] for row in mine if row[key] is not None]
            out[key] = float(np.mean(values)) if values else None
            out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        summary.append(out)
    return summary


def seeds_table(summary, pgd_label):
    def cell(row, key):
        if row[key] is None:
            return "n/a"
        return f"{row[key]:.4f} ± {row[key + '_std']:.4f}" if row[key + "_std"] is not None else f"{row[key]:.4f}"

    lines = [f"| method | clean top-1 | {pgd_label} | mean ImageNet-C-style corruption acc. | steps | "
             "training time | images/s |", "|---|---|---|---|---|---|---|"]
    for row in summary:
        rate = f"{row['images_per_second']:.1f}" if row["images_per_second"] else "n/a"
        lines.append(f"| {row['label']} | {cell(row, 'clean_top_1')} | {cell(row, 'pgd_accuracy')} | "
                     f"{cell(row, 'mean_corruption_accuracy')} | {row['train_steps'] or 'config'} | "
                     f"{row['train_seconds'] / 60:.1f} min | {rate} |")
    return "\n".join(lines)


def compare():
    from advprop_tf.paths import join
    from advprop_tf.training.run_dir import write_atomically, write_json

    if not FLAGS.output_dir:
        raise CompareError("--output_dir: is required")
    if FLAGS.config and not tf.io.gfile.exists(FLAGS.config):
        raise CompareError(f"--config: {FLAGS.config!r} does not exist")
    for method in FLAGS.methods:
        if method not in METHODS:
            raise CompareError(f"--methods: unknown method {method!r}; valid: {', '.join(METHODS)}")
    if not 0 < FLAGS.finetune_fraction < 1:
        raise CompareError(f"--finetune_fraction: must be in (0, 1), got {FLAGS.finetune_fraction:g}")
    if FLAGS.time_budget_seconds < 0:
        raise CompareError(f"--time_budget_seconds: must be >= 0, got {FLAGS.time_budget_seconds:g}")
    try:
        seeds = [int(s) for s in FLAGS.seeds] or [None]
    except ValueError:
        raise CompareError(f"--seeds: must be integers, got {','.join(FLAGS.seeds)}") from None
    if FLAGS.model_dirs and FLAGS.seeds:
        raise CompareError("--model_dirs: takes one existing run per method, so not with --seeds")
    existing = {}
    for item in FLAGS.model_dirs:
        method, _, path = item.partition("=")
        if method not in FLAGS.methods or not tf.io.gfile.isdir(path):
            raise CompareError(f"--model_dirs: {item!r} is not method=<existing directory> for a compared method")
        existing[method] = path
    variants = parse_variants(FLAGS.variant)
    if FLAGS.model_dirs and FLAGS.variant:
        raise CompareError("--model_dirs: takes one existing run per method, so not with --variant")
    started = time.time()
    # all validated before the first one trains
    plans = {(v, seed): plan(seed, existing, v, o) for v, o in variants.items() for seed in seeds}
    seconds = {}
    if FLAGS.time_budget_seconds:
        for v in variants:
            seconds.update({(v, *key): value for key, value in calibrate(plans[(v, seeds[0])]).items()})
            for seed in seeds:
                apply_budget(plans[(v, seed)], {key[1:]: value for key, value in seconds.items() if key[0] == v},
                             FLAGS.time_budget_seconds)
    rows = [row for v in variants for seed in seeds for method in FLAGS.methods
            for row in run_method(method, plans[(v, seed)][method], existing, v)]
    pgd = rows[0]["evaluation"]["pgd"]
    pgd_label = f"PGD-{pgd['num_steps']} ε={pgd['epsilon']:g} acc." + (" (targeted)" if pgd["targeted"] else "") + (
        f" (worst of {pgd['restarts']} restarts)" if pgd.get("restarts", 1) > 1 else "")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    wall = time.time() - started
    summary = summarize(rows)
    table = markdown_table(rows, pgd_label) if len(seeds) == 1 else seeds_table(summary, pgd_label)
    budget = (f" Every method had the same training budget of {FLAGS.time_budget_seconds:g} s (steps from "
              "its measured s/step)." if FLAGS.time_budget_seconds else "")
    tf.io.gfile.makedirs(FLAGS.output_dir)
    have_chart = write_chart(summary if len(seeds) > 1 else rows, join(FLAGS.output_dir, "comparison.png"), pgd_label,
                             seed_rows=rows if len(seeds) > 1 else None)
    if len(variants) > 1:
        write_variant_chart(summary, join(FLAGS.output_dir, "variant.png"), pgd_label, list(variants))
    seeds_note = f" Seeds {', '.join(map(str, seeds))}: mean ± sample std." if len(seeds) > 1 else ""
    write_atomically(join(FLAGS.output_dir, "comparison.md"),
                     f"Command: `{command}`\n\nWall time: {wall / 60:.1f} min; evaluated on "
                     f"{rows[0]['examples']} held-out images.{budget}{seeds_note}\n\n{table}\n"
                     + ("\n![comparison](comparison.png)\n" if have_chart else ""))
    write_json(join(FLAGS.output_dir, "comparison.json"),
               {"command": command, "wall_seconds": wall, "rows": rows, "summary": summary,
                "seconds_per_step": {("" if v is None else f"{v}:") + m + ("" if i is None else f":{i}"): value
                                     for (v, m, i), value in seconds.items()}})
    print(table)
    if not have_chart:
        print("(no chart: pip install matplotlib to get comparison.png)")
    print(f"wrote {join(FLAGS.output_dir, 'comparison.md')} in {wall / 60:.1f} min")


def main(argv):
    from advprop_tf import cli
    from advprop_tf.evaluate import UsageError

    if len(argv) > 1:
        cli.fail("compare_methods", f"unexpected arguments {argv[1:]}")
    from advprop_tf.evaluation import EvaluationError

    try:
        compare()
    except (CompareError, UsageError, EvaluationError) as e:
        cli.fail("compare_methods", str(e))
    except Interrupted as e:
        print(f"compare_methods: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from advprop_tf import cli

    cli.run(main, "compare_methods")
