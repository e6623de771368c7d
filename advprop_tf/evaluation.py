"""Measure a classifier the way the paper does: clean, under PGD, under corruptions.

A `Classifier` is a `logits_fn(pixels)` on [0, 255] pixels plus what the
evaluation needs to know (resolution, classes); it comes from a training
directory (any BN domain, EMA or raw weights) or from an exported SavedModel,
so the same numbers can be had from both. `evaluate()` walks the eval set
once: per batch it counts clean top-1/top-5, attacks the same network with
PGD, and classifies every requested corruption at every severity.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from advprop_tf.attacks.pgd import pgd, random_wrong_labels
from advprop_tf.data.corruptions import corrupt
from advprop_tf.data.imagenet_c import ALEXNET_MEAN_ERRORS, IMAGENET_C_CORRUPTIONS
from advprop_tf.data.imagenet_c import SEVERITIES as IMAGENET_C_SEVERITIES
from advprop_tf.paths import join


class EvaluationError(ValueError):
    """A request that cannot be evaluated; the message names the flag."""


@dataclasses.dataclass
class Classifier:
    logits_fn: Callable  # float32 pixels [N, R, R, 3] in [0, 255] -> logits [N, C]
    resolution: int
    num_classes: int
    description: dict  # what was loaded: kind, path, domain, ema, step, model
    run_config: dict = dataclasses.field(default_factory=dict)  # a training directory's run_config.json


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    epsilon: float
    num_steps: int
    step_size: float
    targeted: bool = True
    random_start: bool = False


def topk_counts(logits, labels, k: int):
    """[top-1 correct, top-k correct, examples] summed over a batch; label -1 marks padding."""
    labels = tf.cast(labels, tf.int32)
    valid = tf.cast(labels >= 0, tf.float32)
    labels = tf.maximum(labels, 0)
    top1 = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
    topk = tf.cast(tf.nn.in_top_k(labels, tf.cast(logits, tf.float32), k), tf.float32)
    return tf.stack([tf.reduce_sum(top1 * valid), tf.reduce_sum(topk * valid), tf.reduce_sum(valid)])


# ------------------------------------------------------------------ loading
def classifier_from_model_dir(model_dir: str, domain: str = "clean", use_ema: bool | None = None) -> Classifier:
    """The training model of `model_dir`, routed through `domain`'s BN, in inference mode."""
    from advprop_tf.serving import ExportError, load_trained

    try:
        model, run, step, use_ema = load_trained(model_dir, use_ema, domain)
    except ExportError as e:
        raise EvaluationError(str(e)) from None
    spec = tf.TensorSpec([None, model.resolution, model.resolution, 3], tf.float32)
    logits_fn = tf.function(lambda x: tf.cast(model(x, training=False, domain=domain), tf.float32),
                            input_signature=[spec])
    return Classifier(logits_fn, model.resolution, model.num_classes, {
        "kind": "model_dir", "path": model_dir, "model": model.model_name, "domain": domain,
        "ema": bool(use_ema), "step": step, "method": run.get("method"),
    }, run)


def classifier_from_saved_model(path: str, domain: str | None = None) -> Classifier:
    """An exported SavedModel (advprop_tf.export), through its predict_pixels signature."""
    if not tf.io.gfile.exists(join(path, "saved_model.pb")):
        raise EvaluationError(f"--saved_model: {path!r} holds no saved_model.pb")
    loaded = tf.saved_model.load(path)
    if "predict_pixels" not in loaded.signatures:
        raise EvaluationError(f"--saved_model: {path!r} has no predict_pixels signature (not an advprop_tf export)")
    metadata = {}
    metadata_path = join(path, "assets", "metadata.json")
    if tf.io.gfile.exists(metadata_path):
        with tf.io.gfile.GFile(metadata_path) as f:
            metadata = json.load(f)
    exported_domain = metadata.get("domain", "clean")
    if domain is not None and domain != exported_domain:
        raise EvaluationError(
            f"--domain: the SavedModel holds only the {exported_domain!r} BN; export the {domain!r} domain "
            "(python -m advprop_tf.export --domain=...) or evaluate the model_dir"
        )
    signature = loaded.signatures["predict_pixels"]
    resolution = int(signature.structured_input_signature[1]["pixels"].shape[1])
    num_classes = int(signature.structured_outputs["logits"].shape[-1])

    def logits_fn(x):
        return signature(pixels=x)["logits"]

    logits_fn.loaded = loaded  # keep the restored object (and its variables) alive
    return Classifier(logits_fn, resolution, num_classes, {
        "kind": "saved_model", "path": path, "model": metadata.get("model"), "domain": exported_domain,
        "ema": metadata.get("ema"), "step": metadata.get("step"), "method": metadata.get("method"),
    })


def restrict_to_labels(classifier: Classifier, subset: Sequence[int]) -> Classifier:
    """Only the classes in `subset` compete (ImageNet-A/R: 200 of the 1000 ImageNet classes).

    Logits become [N, len(subset)]; labels must then be mapped with `subset_label_map`.
    """
    subset = sorted(int(i) for i in subset)
    if not subset or subset[-1] >= classifier.num_classes or subset[0] < 0:
        raise EvaluationError(f"--label_subset: classes must lie in 0..{classifier.num_classes - 1}")
    indices = tf.constant(subset, tf.int32)
    inner = classifier.logits_fn

    def logits_fn(x):
        return tf.gather(inner(x), indices, axis=-1)

    return dataclasses.replace(classifier, logits_fn=logits_fn, num_classes=len(subset),
                               description=dict(classifier.description, label_subset=len(subset)))


def subset_label_map(subset: Sequence[int]):
    """labels -> position in the sorted subset (-1, i.e. ignored, for a label outside it)."""
    subset = tf.constant(sorted(int(i) for i in subset), tf.int32)

    def remap(labels):
        labels = tf.cast(labels, tf.int32)
        position = tf.searchsorted(subset, labels)
        clipped = tf.minimum(position, tf.size(subset) - 1)
        inside = tf.logical_and(labels >= 0, tf.equal(tf.gather(subset, clipped), labels))
        return tf.where(inside, clipped, -1)

    return remap


# ------------------------------------------------------------- the measure
def evaluate(classifier: Classifier, dataset, *, attack: AttackSpec | None = None,
             corruptions: Sequence[str] = (), severities: Sequence[int] = (1, 2, 3, 4, 5),
             seed: int = 0, num_examples: int | None = None, max_batches: int | None = None,
             label_map: Callable | None = None, progress: Callable[[str], None] | None = None,
             strategy: tf.distribute.Strategy | None = None, corrupt_fn: Callable = corrupt) -> dict:
    """One pass over `dataset` (batches of pixels, labels); returns the results dict.

    This is THE evaluation loop: the trainer calls it with its strategy and a
    distributed dataset (each replica counts its share, the counts are summed
    across replicas and workers), the evaluate CLI with a plain dataset.
    Labels -1 mark padding and are not counted. Randomness (attack targets
    and start, corruption noise) is seeded by (seed, batch index, replica):
    the same seed and batch size give the same numbers. `corrupt_fn` makes
    the corrupted images: our in-graph ImageNet-C-style ones by default, or
    the ImageNet-C code's (data/imagenet_c.corrupt_exact, CPU only).
    """
    strategy = strategy or tf.distribute.get_strategy()
    k = min(5, classifier.num_classes)
    logits_fn = classifier.logits_fn
    severities = tuple(severities)

    def clean_counts(images, labels, batch_seed):
        del batch_seed
        return topk_counts(logits_fn(images), labels, k)

    def attack_counts(images, labels, batch_seed):
        valid = tf.cast(labels >= 0, tf.float32)
        safe_labels = tf.maximum(labels, 0)
        adversarial = pgd(logits_fn, images, safe_labels, attack.epsilon, attack.num_steps, attack.step_size,
                          targeted=attack.targeted, random_start=attack.random_start,
                          num_classes=classifier.num_classes, seed=batch_seed)
        predictions = tf.argmax(logits_fn(adversarial), -1, output_type=tf.int32)
        correct = tf.reduce_sum(tf.cast(tf.equal(predictions, safe_labels), tf.float32) * valid)
        if attack.targeted:
            targets = random_wrong_labels(safe_labels, classifier.num_classes, batch_seed)
            hit = tf.reduce_sum(tf.cast(tf.equal(predictions, targets), tf.float32) * valid)
        else:
            hit = tf.reduce_sum(tf.cast(tf.not_equal(predictions, safe_labels), tf.float32) * valid)
        return tf.stack([correct, hit])

    def corruption_counts(images, labels, batch_seed):
        """[corruptions, severities] correct counts; one graph for all (one trace)."""
        valid = tf.cast(labels >= 0, tf.float32)[None]
        rows = []
        for name in corruptions:
            corrupted = tf.concat([corrupt_fn(images, name, s, batch_seed) for s in severities], axis=0)
            predictions = tf.reshape(tf.argmax(logits_fn(corrupted), -1, output_type=tf.int32),
                                     [len(severities), -1])
            correct = tf.cast(tf.equal(predictions, tf.maximum(labels, 0)[None]), tf.float32) * valid
            rows.append(tf.reduce_sum(correct, axis=1))
        return tf.stack(rows)

    measures = [clean_counts]
    if attack is not None:
        measures.append(attack_counts)
    if corruptions:
        measures.append(corruption_counts)

    def replica_counts(images, labels, index):
        labels = tf.cast(labels, tf.int32)
        if label_map is not None:
            labels = label_map(labels)
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        # Replica 0 keeps (seed, index): one device gives the numbers it always gave.
        batch_seed = tf.stack([tf.constant(seed, tf.int32), index + 1_000_003 * tf.cast(replica, tf.int32)])
        return [measure(images, labels, batch_seed) for measure in measures]

    @tf.function(reduce_retracing=True)
    def batch_counts(images, labels, index):
        per_replica = strategy.run(replica_counts, args=(images, labels, index))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in per_replica]

    totals = None
    started = last_report = time.time()
    for index, (images, labels) in enumerate(dataset):
        if max_batches is not None and index >= max_batches:
            break
        counts = [c.numpy() for c in batch_counts(images, labels, tf.constant(index, tf.int32))]
        totals = counts if totals is None else [t + c for t, c in zip(totals, counts)]
        if progress is not None and (time.time() - last_report > 10 or index == 0):
            last_report = time.time()
            progress(_progress_line(int(totals[0][2]), num_examples, time.time() - started))
    if totals is None:
        totals = [np.zeros(3), np.zeros(2), np.zeros([len(corruptions), len(severities)])][:len(measures)]
    clean = totals.pop(0)
    attacked = totals.pop(0) if attack is not None else None
    corrupted = totals.pop(0) if corruptions else None
    n = max(clean[2], 1.0)
    results = {
        "classifier": classifier.description,
        "examples": int(clean[2]),
        "clean": {"top_1": float(clean[0] / n), "top_5": float(clean[1] / n)},
        "seconds": round(time.time() - started, 1),
    }
    if attack is not None:
        results["pgd"] = dict(dataclasses.asdict(attack), accuracy=float(attacked[0] / n))
        results["pgd"]["target_success_rate" if attack.targeted else "error_rate"] = float(attacked[1] / n)
    if corruptions:
        per_name = {}
        for name, counts in zip(corruptions, corrupted):
            accuracy = {str(s): float(c / n) for s, c in zip(severities, counts)}
            per_name[name] = {"accuracy": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values())))}
        results["corruptions"] = per_name
        results["mean_corruption_accuracy"] = float(np.mean([v["mean_accuracy"] for v in per_name.values()]))
    if progress is not None:
        progress(_progress_line(int(clean[2]), num_examples, time.time() - started, finished=True))
    return results


def _progress_line(done: int, total: int | None, seconds: float, finished: bool = False):
    rate = done / max(seconds, 1e-9)
    line = f"evaluated {done}" + (f"/{total}" if total else "") + f" images | {rate:.1f} img/s"
    if total and not finished and rate > 0:
        eta = max(0.0, (total - done) / rate)
        line += f" | ETA {int(eta) // 60}:{int(eta) % 60:02d}"
    return line


def tfds_corruptions(measure: Callable, corruptions, severities, log=print) -> dict:
    """Accuracy on each prepared corrupted dataset: measure(name, severity) -> evaluate() results.

    Returns {"corruptions": {name: {"accuracy": {s: a}, "mean_accuracy": m}}, "mean_corruption_accuracy"},
    the shape evaluate() gives on-the-fly corruptions.
    """
    per_name = {}
    for name in corruptions:
        accuracy = {}
        for severity in severities:
            log(f"{name} severity {severity}")
            accuracy[severity] = measure(name, severity)["clean"]["top_1"]
        per_name[name] = {"accuracy": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values())))}
    return {"corruptions": per_name,
            "mean_corruption_accuracy": float(np.mean([v["mean_accuracy"] for v in per_name.values()]))}


# --------------------------------------------------------------------- mCE
def corruption_errors(results: dict, reference: dict) -> dict:
    """ImageNet-C's corruption error: CE_c = sum_s E(f, c, s) / sum_s E(ref, c, s); mCE = mean_c CE_c.

    Both dicts are `evaluate()` results (or hold "corruptions" in that shape);
    values are in percent, as the paper reports them. Raises EvaluationError
    naming a corruption or severity the reference lacks.
    """
    ours = results.get("corruptions") or {}
    theirs = reference.get("corruptions") or {}
    per_corruption = {}
    for name, entry in ours.items():
        if name not in theirs:
            raise EvaluationError(f"--reference_results: has no result for corruption {name!r}")
        errors, reference_errors = 0.0, 0.0
        for severity, accuracy in entry["accuracy"].items():
            if severity not in theirs[name]["accuracy"]:
                raise EvaluationError(
                    f"--reference_results: has no result for {name!r} at severity {severity}")
            errors += 1.0 - accuracy
            reference_errors += 1.0 - theirs[name]["accuracy"][severity]
        if reference_errors <= 0:
            raise EvaluationError(f"--reference_results: the reference makes no error on {name!r}; CE undefined")
        per_corruption[name] = 100.0 * errors / reference_errors
    return {"corruption_error": per_corruption,
            "mce": float(np.mean(list(per_corruption.values()))) if per_corruption else None}


def imagenet_c_mce(accuracies: dict) -> dict:
    """{corruption: {severity: accuracy}} for all 15 x 5 -> the ImageNet-C paper's CE and mCE, in percent:
    `corruption_errors` with AlexNet's published errors as the reference.

    Raises ValueError naming the first missing corruption or severity: an mCE
    over fewer corruptions is not the paper's number.
    """
    ours = {}
    for name in IMAGENET_C_CORRUPTIONS:
        if name not in accuracies:
            raise ValueError(f"the mCE needs all 15 ImageNet-C corruptions; {name!r} is missing")
        by_severity = {int(s): a for s, a in accuracies[name].items()}
        missing = [s for s in IMAGENET_C_SEVERITIES if s not in by_severity]
        if missing:
            raise ValueError(f"the mCE needs severities 1-5; {name!r} lacks {missing}")
        ours[name] = {"accuracy": {s: by_severity[s] for s in IMAGENET_C_SEVERITIES}}
    alexnet = {name: {"accuracy": {s: 1.0 - error for s in IMAGENET_C_SEVERITIES}}
               for name, error in ALEXNET_MEAN_ERRORS.items()}
    return dict(corruption_errors({"corruptions": ours}, {"corruptions": alexnet}),
                reference="AlexNet (ImageNet-C paper)")


def results_table(results: dict) -> str:
    """A plain-text summary of `evaluate()` results."""
    lines = [f"examples           {results['examples']}",
             f"clean top-1        {results['clean']['top_1']:.4f}",
             f"clean top-5        {results['clean']['top_5']:.4f}"]
    if "pgd" in results:
        p = results["pgd"]
        kind = "targeted" if p["targeted"] else "untargeted"
        lines.append(f"PGD-{p['num_steps']} eps {p['epsilon']:g} ({kind}) accuracy {p['accuracy']:.4f}")
        if p["targeted"]:
            lines.append(f"  target success rate {p['target_success_rate']:.4f}")
    if "corruptions" in results:
        exact = results.get("corruption_backend", "ingraph") != "ingraph"
        kind = "ImageNet-C" if exact else "ImageNet-C-style"
        severities = list(next(iter(results["corruptions"].values()))["accuracy"])
        lines.append(f"{kind} ({results.get('corruption_backend', 'ingraph')})")
        lines.append("corruption         " + " ".join(f"   s{s}" for s in severities) + "   mean")
        for name, entry in results["corruptions"].items():
            values = " ".join(f"{entry['accuracy'][s]:.3f}" for s in severities)
            ce = results.get("mce", {}).get("corruption_error", {}).get(name)
            lines.append(f"{name:18s} {values}  {entry['mean_accuracy']:.3f}" + (f"  CE {ce:.1f}" if ce else ""))
        lines.append(f"mean {kind} corruption accuracy {results['mean_corruption_accuracy']:.4f}")
        if results.get("mce"):
            reference = results["mce"].get("reference")
            lines.append(f"mCE {results['mce']['mce']:.1f} (" + (f"{reference}: comparable with the papers)"
                         if reference else f"{kind}, relative to --reference_results)"))
    return "\n".join(lines)
