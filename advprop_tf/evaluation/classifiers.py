"""Where a Classifier comes from: a training directory (any BN domain, EMA or raw weights) or an exported
SavedModel, so that the same numbers can be had from both; and label subsets (ImageNet-A/R)."""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import tensorflow as tf

from advprop_tf.domains import MAIN
from advprop_tf.errors import ConfigError
from advprop_tf.paths import join


class EvaluationError(ConfigError):
    """A request that cannot be evaluated; `field` names the setting."""


@dataclasses.dataclass
class Classifier:
    logits_fn: Callable  # float32 pixels [N, R, R, 3] in [0, 255] -> logits [N, C]
    resolution: int
    num_classes: int
    description: dict  # what was loaded: kind, path, domain, ema, step, model
    run_config: dict = dataclasses.field(default_factory=dict)  # a training directory's run_config.json


def classifier_from_model_dir(model_dir: str, domain: str = MAIN, use_ema: bool | None = None,
                              bn_mode: str = "inference") -> Classifier:
    """The training model of `model_dir`, routed through `domain`'s BN, in inference mode, or with `bn_mode`
    "batch" normalizing each batch by its own statistics as in training (without updating them): the BN
    that behaves the same at training and test time of "Intriguing Properties of Adversarial Training at
    Scale". ConfigError naming the field on a bad directory, domain or EMA choice."""
    from advprop_tf.training.trained import load_trained

    model, run, step, use_ema = load_trained(model_dir, use_ema, domain)
    spec = tf.TensorSpec([None, model.resolution, model.resolution, 3], tf.float32)
    logits_fn = tf.function(lambda x: tf.cast(model(x, training=False, domain=domain, bn_mode=bn_mode), tf.float32),
                            input_signature=[spec])
    return Classifier(logits_fn, model.resolution, model.num_classes, {
        "kind": "model_dir", "path": model_dir, "model": model.model_name, "domain": domain,
        "ema": bool(use_ema), "step": step, "method": run.get("method"), "bn_mode": bn_mode,
    }, run)


def classifier_from_saved_model(path: str, domain: str | None = None) -> Classifier:
    """An exported SavedModel (advprop_tf.export), through its predict_pixels signature."""
    if not tf.io.gfile.exists(join(path, "saved_model.pb")):
        raise EvaluationError("saved_model", f"{path!r} holds no saved_model.pb")
    loaded = tf.saved_model.load(path)
    if "predict_pixels" not in loaded.signatures:
        raise EvaluationError("saved_model", f"{path!r} has no predict_pixels signature (not an advprop_tf export)")
    metadata = {}
    metadata_path = join(path, "assets", "metadata.json")
    if tf.io.gfile.exists(metadata_path):
        with tf.io.gfile.GFile(metadata_path) as f:
            metadata = json.load(f)
    exported_domain = metadata.get("domain", MAIN)
    if domain is not None and domain != exported_domain:
        raise EvaluationError(
            "domain", f"the SavedModel holds only the {exported_domain!r} BN; export the {domain!r} domain "
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
        raise EvaluationError("label_subset", f"classes must lie in 0..{classifier.num_classes - 1}")
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
