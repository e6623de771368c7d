"""Reporting evaluation results: ImageNet-C's corruption errors and mCE, and the text table."""

from __future__ import annotations

import numpy as np

from advprop_tf.data.imagenet_c import ALEXNET_MEAN_ERRORS, IMAGENET_C_CORRUPTIONS
from advprop_tf.data.imagenet_c import SEVERITIES as IMAGENET_C_SEVERITIES
from advprop_tf.domains import CLEAN_IMAGES
from advprop_tf.evaluation.classifiers import EvaluationError


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
            raise EvaluationError("reference_results", f"has no result for corruption {name!r}")
        errors, reference_errors = 0.0, 0.0
        for severity, accuracy in entry["accuracy"].items():
            if severity not in theirs[name]["accuracy"]:
                raise EvaluationError("reference_results", f"has no result for {name!r} at severity {severity}")
            errors += 1.0 - accuracy
            reference_errors += 1.0 - theirs[name]["accuracy"][severity]
        if reference_errors <= 0:
            raise EvaluationError("reference_results", f"the reference makes no error on {name!r}; CE undefined")
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
             f"clean top-1        {results[CLEAN_IMAGES]['top_1']:.4f}",
             f"clean top-5        {results[CLEAN_IMAGES]['top_5']:.4f}"]
    if "pgd" in results:
        p = results["pgd"]
        kind = "targeted" if p["targeted"] else "untargeted"
        restarts = f", worst of {p['restarts']} restarts" if p.get("restarts", 1) > 1 else ""
        lines.append(f"PGD-{p['num_steps']} eps {p['epsilon']:g} ({kind}{restarts}) accuracy {p['accuracy']:.4f}")
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
