"""Measure a classifier the way the paper does: clean, under PGD, under corruptions.

A `Classifier` is a `logits_fn(pixels)` on [0, 255] pixels plus what the
evaluation needs to know (resolution, classes):
  classifiers.py  where one comes from (a training directory, a SavedModel), label subsets;
  loop.py         THE evaluation loop, used by the trainer and the evaluate command line alike;
  report.py       ImageNet-C's CE and mCE, and the text table.
"""

from advprop_tf.domains import CLEAN_IMAGES
from advprop_tf.evaluation.classifiers import (
    Classifier,
    EvaluationError,
    classifier_from_model_dir,
    classifier_from_saved_model,
    restrict_to_labels,
    subset_label_map,
)
from advprop_tf.evaluation.loop import evaluate, tfds_corruptions, topk_counts
from advprop_tf.evaluation.report import corruption_errors, imagenet_c_mce, results_table

__all__ = [
    "CLEAN_IMAGES", "Classifier", "EvaluationError", "classifier_from_model_dir", "classifier_from_saved_model",
    "corruption_errors", "evaluate", "imagenet_c_mce", "restrict_to_labels", "results_table", "subset_label_map",
    "tfds_corruptions", "topk_counts",
]
