"""THE evaluation loop: clean top-1/top-5, PGD on the same network, corruptions at every severity.

The trainer calls it with its strategy and a distributed dataset, the evaluate
command line with a plain one.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from advprop_tf import randomness
from advprop_tf.attacks.pgd import AttackConfig, pgd, random_wrong_labels
from advprop_tf.data.corruptions import corrupt
from advprop_tf.domains import CLEAN_IMAGES
from advprop_tf.evaluation.classifiers import Classifier


def topk_counts(logits, labels, k: int):
    """[top-1 correct, top-k correct, examples] summed over a batch; label -1 marks padding."""
    labels = tf.cast(labels, tf.int32)
    valid = tf.cast(labels >= 0, tf.float32)
    labels = tf.maximum(labels, 0)
    top1 = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
    topk = tf.cast(tf.nn.in_top_k(labels, tf.cast(logits, tf.float32), k), tf.float32)
    return tf.stack([tf.reduce_sum(top1 * valid), tf.reduce_sum(topk * valid), tf.reduce_sum(valid)])


def clean_measure(classifier: Classifier):
    """Top-1, top-k correct and examples of a batch (k = 5, or the classes)."""
    k = min(5, classifier.num_classes)

    def counts(images, labels, batch_seed):
        del batch_seed
        return topk_counts(classifier.logits_fn(images), labels, k)

    return counts


RESTART_STREAM = 0x5E57  # restart r's start and targets are folded from the batch's seed with this salt + r


def attack_measure(classifier: Classifier, attack: AttackConfig, restarts: int = 1):
    """[correct under PGD, targets hit (targeted) or errors (untargeted)] of a batch, the attack made on the
    evaluated network itself. With `restarts` > 1 each of them starts at its own random point of the ball
    (and a targeted one draws its own targets): an image counts as correct only if it survives all of them,
    as hit if any of them hits (the per-image worst case, as robustness is reported)."""
    logits_fn, num_classes = classifier.logits_fn, classifier.num_classes

    def counts(images, labels, batch_seed):
        valid = tf.cast(labels >= 0, tf.float32)
        safe_labels = tf.maximum(labels, 0)
        robust = tf.ones_like(valid, tf.bool)
        hit = tf.zeros_like(valid, tf.bool)
        for restart in range(restarts):
            seed = batch_seed if restarts == 1 else randomness.fold_in(batch_seed, RESTART_STREAM + restart)
            adversarial = pgd(logits_fn, images, safe_labels, attack.epsilon, attack.steps, attack.step_size,
                              targeted=attack.targeted, random_start=attack.random_start or restarts > 1,
                              num_classes=num_classes, seed=seed,
                              prob_start_from_clean=attack.prob_start_from_clean if restarts == 1 else 0.0)
            predictions = tf.argmax(logits_fn(adversarial), -1, output_type=tf.int32)
            robust = tf.logical_and(robust, tf.equal(predictions, safe_labels))
            if attack.targeted:
                hit = tf.logical_or(hit, tf.equal(predictions, random_wrong_labels(safe_labels, num_classes, seed)))
            else:
                hit = tf.logical_not(robust)
        return tf.stack([tf.reduce_sum(tf.cast(robust, tf.float32) * valid),
                         tf.reduce_sum(tf.cast(hit, tf.float32) * valid)])

    return counts


def corruption_measure(classifier: Classifier, corruptions, severities, corrupt_fn=corrupt):
    """[corruptions, severities] correct counts of a batch; one graph for all (one trace)."""

    def counts(images, labels, batch_seed):
        valid = tf.cast(labels >= 0, tf.float32)[None]
        rows = []
        for name in corruptions:
            corrupted = tf.concat([corrupt_fn(images, name, s, batch_seed) for s in severities], axis=0)
            predictions = tf.reshape(tf.argmax(classifier.logits_fn(corrupted), -1, output_type=tf.int32),
                                     [len(severities), -1])
            correct = tf.cast(tf.equal(predictions, tf.maximum(labels, 0)[None]), tf.float32) * valid
            rows.append(tf.reduce_sum(correct, axis=1))
        return tf.stack(rows)

    return counts


def evaluate(classifier: Classifier, dataset, *, attack: AttackConfig | None = None,
             corruptions: Sequence[str] = (), severities: Sequence[int] = (1, 2, 3, 4, 5),
             seed: int = 0, num_examples: int | None = None, max_batches: int | None = None,
             label_map: Callable | None = None, progress: Callable[[str], None] | None = None,
             strategy: tf.distribute.Strategy | None = None, corrupt_fn: Callable = corrupt,
             restarts: int = 1) -> dict:
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
    severities = tuple(severities)
    measures = [clean_measure(classifier)]
    if attack is not None:
        measures.append(attack_measure(classifier, attack, restarts))
    if corruptions:
        measures.append(corruption_measure(classifier, corruptions, severities, corrupt_fn))

    def replica_counts(images, labels, index):
        labels = tf.cast(labels, tf.int32)
        if label_map is not None:
            labels = label_map(labels)
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        batch_seed = randomness.replica_seed(seed, index, replica)
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
    results = _results(classifier, totals, attack, corruptions, severities, time.time() - started, restarts)
    if progress is not None:
        progress(_progress_line(results["examples"], num_examples, time.time() - started, finished=True))
    return results


def _results(classifier, totals, attack, corruptions, severities, seconds, restarts=1) -> dict:
    """The results dict of the summed counts."""
    clean = totals.pop(0)
    attacked = totals.pop(0) if attack is not None else None
    corrupted = totals.pop(0) if corruptions else None
    n = max(clean[2], 1.0)
    results = {
        "classifier": classifier.description,
        "examples": int(clean[2]),
        CLEAN_IMAGES: {"top_1": float(clean[0] / n), "top_5": float(clean[1] / n)},
        "seconds": round(seconds, 1),
    }
    if attack is not None:
        results["pgd"] = dict(epsilon=attack.epsilon, num_steps=attack.steps, step_size=attack.step_size,
                              targeted=attack.targeted, random_start=attack.random_start or restarts > 1,
                              restarts=restarts, accuracy=float(attacked[0] / n))
        results["pgd"]["target_success_rate" if attack.targeted else "error_rate"] = float(attacked[1] / n)
    if corruptions:
        per_name = {}
        for name, counts in zip(corruptions, corrupted):
            accuracy = {str(s): float(c / n) for s, c in zip(severities, counts)}
            per_name[name] = {"accuracy": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values())))}
        results["corruptions"] = per_name
        results["mean_corruption_accuracy"] = float(np.mean([v["mean_accuracy"] for v in per_name.values()]))
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
            accuracy[severity] = measure(name, severity)[CLEAN_IMAGES]["top_1"]
        per_name[name] = {"accuracy": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values())))}
    return {"corruptions": per_name,
            "mean_corruption_accuracy": float(np.mean([v["mean_accuracy"] for v in per_name.values()]))}
