"""python -m advprop_tf.evaluate (--model_dir=<dir> | --saved_model=<dir>) [--dataset=<source>] [...]

Measures one network the way the paper does and prints a table:
  clean top-1 / top-5;
  --attack=pgd --epsilon=4 --num_steps=5 --step_size=1 [--targeted]: accuracy under
      PGD on the evaluated network itself (and the targeted attack's success rate);
  --corruptions=all|name,... --severities=1,2,3,4,5: corrupted images, per-corruption
      accuracy and mean corruption accuracy, from --corruption_backend:
        ingraph (default): our ImageNet-C-style corruptions generated on the fly (quick,
          not ImageNet-C's numbers; an mCE only relative to --reference_results=<json>);
        imagecorruptions: the ImageNet-C code on any dataset (pip install -e ".[corruptions]");
        tfds: the prepared TFDS imagenet2012_corrupted/<name>_<severity> datasets.
      The last two with all 15 corruptions x 5 severities give the ImageNet-C mCE
      (AlexNet-normalized, the paper's): --corruption_backend=tfds --corruptions=all.
Results go to --output (JSON; default <model_dir>/evaluation_<domain>.json, or
evaluation_<version>.json beside a SavedModel).

Without --dataset, a training directory is evaluated on the validation split of
the data it was trained on. ImageNet-A/R (200 of the 1000 classes): pass
--label_subset=auto (the classes present in the split) or a file of class ids.
Bad flags exit with status 2 and one line naming the flag.
"""

from __future__ import annotations

import sys

from advprop_tf.startup import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()  # before anything imports TensorFlow: its C++ start-up notices held back

from absl import flags  # noqa: E402

from advprop_tf import cli  # noqa: E402
from advprop_tf.domains import MAIN  # noqa: E402
from advprop_tf.errors import ConfigError  # noqa: E402

from advprop_tf.attacks.pgd import AttackConfig  # noqa: E402
from advprop_tf.data.corruptions import parse_corruptions, parse_severities  # noqa: E402
from advprop_tf.data.imagenet_c import BACKENDS, IMAGENET_C_CORRUPTIONS  # noqa: E402
from advprop_tf.data.preprocessing import EVAL_CROPS  # noqa: E402
from advprop_tf.data.sources import SOURCE_KINDS  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(fv=FLAGS):
    def d(kind, *args, **kwargs):
        getattr(flags, f"DEFINE_{kind}")(*args, flag_values=fv, **kwargs)

    d("string", "model_dir", None, "Training directory to evaluate (newest checkpoint).")
    d("string", "saved_model", None, "Or: an exported SavedModel directory (export/<version>).")
    d("string", "domain", None, "BN domain of a training directory (default clean; adv = the robust one).")
    d("bool", "use_ema", None, "Evaluate the EMA averages (as exported) rather than the raw weights "
      "(default: when the run kept an EMA).")
    d("string", "dataset", None, f"Data source ({', '.join(SOURCE_KINDS)}); default: the training data.")
    d("string", "data_dir", None, "Location for tfrecord/folder sources, or TFDS data_dir.")
    d("enum", "eval_crop", "center", list(EVAL_CROPS), "center: the authors' 0.875 center crop; none: resize "
      "only, for images that are already cropped (ImageNet-C and folders of such images). The tfds corruption "
      "backend always resizes only.")
    d("string", "split", None, "Split to evaluate: validation (TFDS: or test) or train. Default: validation; "
      "for a --dataset=folder:<dir> without --holdout_fraction, all of its images.")
    d("float", "holdout_fraction", None, "folder: held-out fraction (default: as trained).")
    d("integer", "num_classes", None, "tfrecord: classes (default 1000).")
    d("integer", "synthetic_examples", None, "synthetic: training examples, which fix the validation split's "
      "size (default: as trained, else 10000).")
    d("integer", "batch_size", 64, "Evaluation batch.")
    d("integer", "max_batches", 0, "Stop after this many batches (0: the whole split).")
    d("enum", "attack", "none", ["none", "pgd"], "Adversarial evaluation.")
    d("float", "epsilon", 4.0, "PGD L-inf radius in pixels (0-255).")
    d("integer", "num_steps", None, "PGD iterations (default: epsilon+1, 1 for epsilon 1).")
    d("float", "step_size", 1.0, "PGD step in pixels.")
    d("bool", "targeted", True, "Attack toward a random wrong class (the authors') or untargeted.")
    d("bool", "random_start", False, "Start PGD at a random point of the epsilon-ball.")
    d("integer", "restarts", 1, "PGD restarts, each from its own random start: an image counts as robust only if "
      "it survives every one (the per-image worst case).")
    d("enum", "bn_mode", "inference", ["inference", "batch"], "A training directory's BNs: inference (moving "
      "statistics) or batch (each batch's own statistics, as in training, not updated; the split is then read in "
      "a fixed random order, so that batches mix the classes; padding would enter the statistics: choose a "
      "--batch_size that divides the split).")
    d("string", "corruptions", "", "all, or a comma-separated list of corruption names.")
    d("enum", "corruption_backend", "ingraph", list(BACKENDS),
      "ingraph (ImageNet-C-style, quick), imagecorruptions (the ImageNet-C code) or tfds "
      "(imagenet2012_corrupted, the 75 prepared configurations).")
    d("list", "severities", ["1", "2", "3", "4", "5"], "Corruption severities, 1..5.")
    d("string", "reference_results", None, "JSON results of a reference model, for the mCE.")
    d("string", "label_subset", "none", "none, auto (classes present in the split) or a file of class ids.")
    d("integer", "seed", 0, "Seed for attack targets/starts and corruption noise.")
    d("string", "output", None, "Results JSON path.")


class UsageError(ConfigError):
    """A bad flag of this command line: `field` is its name."""


def validate(f=FLAGS):
    """Check the flags before TensorFlow builds anything; returns (corruptions, severities, reference)."""
    if bool(f.model_dir) == bool(f.saved_model):
        raise UsageError("model_dir", "give exactly one of --model_dir and --saved_model")
    path = f.model_dir or f.saved_model
    flag = "model_dir" if f.model_dir else "saved_model"
    if not _is_dir(path, flag):
        raise UsageError(flag, f"{path!r} does not exist")
    if f.dataset is not None and f.dataset.partition(":")[0] not in SOURCE_KINDS:
        raise UsageError("dataset", f"unknown data source {f.dataset!r}; valid kinds: {', '.join(SOURCE_KINDS)}")
    if f.saved_model and f.dataset is None:
        raise UsageError("dataset", "is required with --saved_model")
    if f.batch_size < 1:
        raise UsageError("batch_size", f"must be >= 1, got {f.batch_size}")
    if f.epsilon < 0:
        raise UsageError("epsilon", f"must be >= 0, got {f.epsilon:g}")
    if f.step_size <= 0:
        raise UsageError("step_size", f"must be > 0, got {f.step_size:g}")
    if f.num_steps is not None and f.num_steps < 1:
        raise UsageError("num_steps", f"must be >= 1, got {f.num_steps}")
    if f.restarts < 1:
        raise UsageError("restarts", f"must be >= 1, got {f.restarts}")
    if f.restarts > 1 and f.attack != "pgd":
        raise UsageError("restarts", "needs --attack=pgd")
    if f.bn_mode != "inference" and f.saved_model:
        raise UsageError("bn_mode", "applies to --model_dir (an export's BNs are inference-mode only)")
    try:
        if f.corruption_backend == "ingraph":
            corruptions = parse_corruptions(f.corruptions)
        else:
            corruptions = parse_corruptions(f.corruptions, IMAGENET_C_CORRUPTIONS, "ImageNet-C corruption")
    except ValueError as e:
        raise UsageError("corruptions", str(e)) from None
    if f.corruption_backend != "ingraph" and not corruptions:
        raise UsageError("corruptions", f"--corruption_backend={f.corruption_backend} needs corruptions, e.g. all")
    if f.corruption_backend == "imagecorruptions":
        try:
            import imagecorruptions  # noqa: F401
        except ImportError:
            raise UsageError("corruption_backend", 'imagecorruptions is not installed; pip install -e ".[corruptions]"') from None
    try:
        severities = parse_severities(f.severities)
    except ValueError as e:
        raise UsageError("severities", str(e)) from None
    reference = None
    if f.reference_results:
        if not corruptions:
            raise UsageError("reference_results", "needs --corruptions (the mCE compares corruption errors)")
        from advprop_tf.training.run_dir import read_json

        reference = read_json(f.reference_results, field="reference_results")
    if f.label_subset not in ("none", "auto") and not _is_file(f.label_subset, "label_subset"):
        raise UsageError("label_subset", f"{f.label_subset!r} is neither none, auto nor a file")
    return corruptions, severities, reference


def _label_subset(spec, source, split):
    import numpy as np

    if spec == "none":
        return None
    if spec == "auto":
        labels = source.dataset(split).map(lambda data, label: label)
        return sorted(int(v) for v in np.unique(np.fromiter(labels.as_numpy_iterator(), np.int64)))
    import tensorflow as tf

    with tf.io.gfile.GFile(spec) as fh:
        try:
            return sorted({int(token) for token in fh.read().replace(",", " ").split()})
        except ValueError:
            raise UsageError("label_subset", f"{spec!r} must hold integer class ids") from None


def run(f=FLAGS, log=print):
    """Evaluate as the flags say; returns (results, output path)."""
    import math

    from advprop_tf import evaluation
    from advprop_tf.data.pipeline import eval_dataset
    from advprop_tf.data.sources import SourceError, parse_source
    from advprop_tf.training.run_dir import write_json

    corruptions, severities, reference = validate(f)
    if f.model_dir:
        classifier = evaluation.classifier_from_model_dir(f.model_dir, f.domain or MAIN, f.use_ema, f.bn_mode)
    else:
        classifier = evaluation.classifier_from_saved_model(f.saved_model, f.domain)
    run_config = classifier.run_config
    options = run_config.get("data_options", {})
    dataset_spec = f.dataset or run_config.get("dataset")
    if not dataset_spec:
        raise UsageError("dataset", f"is required ({f.model_dir!r} does not record its training data)")
    data_dir = f.data_dir if f.data_dir is not None else (None if f.dataset else options.get("data_dir"))
    # the flag, else the training data's own holdout (another dataset given here has none)
    holdout = f.holdout_fraction if f.holdout_fraction is not None else (
        0.0 if f.dataset else options.get("holdout_fraction", 0.0))
    split = f.split
    if split is None:  # a folder given for evaluation, without a holdout: every image is evaluation data
        split = "train" if f.dataset and f.dataset.partition(":")[0] == "folder" and holdout == 0 else "validation"
    try:
        source = parse_source(
            dataset_spec, data_dir, f.num_classes or options.get("num_classes"), holdout,
            synthetic_size=options.get("synthetic_size", int(math.ceil(classifier.resolution / 0.875))),
            synthetic_examples=f.synthetic_examples or options.get("synthetic_examples", 10_000), seed=0,
        )
        if split not in source.splits:
            raise UsageError("split", f"{dataset_spec!r} has no split {split!r}; it has {source.splits}")
        subset = _label_subset(f.label_subset, source, split)
    except SourceError as e:
        raise UsageError("dataset", e.reason) from None
    label_map = None
    if subset is not None:
        classifier = evaluation.restrict_to_labels(classifier, subset)
        label_map = evaluation.subset_label_map(subset)
    elif source.num_classes and source.num_classes > classifier.num_classes:
        raise UsageError("dataset", f"{dataset_spec!r} has {source.num_classes} classes, the model "
                         f"{classifier.num_classes}; for a class subset pass --label_subset")
    attack = None
    if f.attack == "pgd":
        attack = AttackConfig(f.epsilon, f.num_steps, f.step_size, f.targeted, f.random_start)
    def measure(source, split, crop=f.eval_crop, **kwargs):
        # Padded to full batches (label -1, not counted): every batch has one shape, one trace. Batch statistics
        # need batches that mix the classes as training's did: then the split in a fixed random order.
        data = eval_dataset(source, classifier.resolution, f.batch_size, split=split, pad_to_batch=True, crop=crop,
                            shuffle_seed=f.seed if f.bn_mode == "batch" else None)
        total = source.num_examples(split)
        if f.max_batches:
            total = min(total or f.max_batches * f.batch_size, f.max_batches * f.batch_size)
        return evaluation.evaluate(classifier, data, seed=f.seed, num_examples=total, restarts=f.restarts,
                                   max_batches=f.max_batches or None, label_map=label_map, progress=log, **kwargs)

    on_the_fly = corruptions if f.corruption_backend != "tfds" else ()
    corrupt_fn = {}
    if f.corruption_backend == "imagecorruptions":
        from advprop_tf.data.imagenet_c import corrupt_exact

        corrupt_fn = {"corrupt_fn": corrupt_exact}
    results = measure(source, split, attack=attack, corruptions=on_the_fly, severities=severities, **corrupt_fn)
    results.update(dataset=dataset_spec, split=split, eval_crop=f.eval_crop)
    if f.corruption_backend == "tfds":
        results.update(evaluation.tfds_corruptions(
            # ImageNet-C's images are 224 x 224 after its own center crop: resized, never cropped again
            lambda name, severity: measure(_tfds_source(name, severity, data_dir), "validation", crop="none"),
            corruptions, severities, log))
    results["corruption_backend"] = f.corruption_backend
    complete = set(corruptions) == set(IMAGENET_C_CORRUPTIONS) and set(severities) == {1, 2, 3, 4, 5}
    if f.corruption_backend != "ingraph" and complete:  # the paper's mCE needs all 15 x 5
        results["mce"] = evaluation.imagenet_c_mce({n: v["accuracy"] for n, v in results["corruptions"].items()})
    elif reference is not None:
        results["mce"] = evaluation.corruption_errors(results, reference)
    output = f.output or _default_output(f, classifier)
    write_json(output, results)
    return results, output


def _tfds_source(name, severity, data_dir):
    from advprop_tf.data.imagenet_c import tfds_name
    from advprop_tf.data.sources import SourceError, parse_source

    try:
        return parse_source(f"tfds:{tfds_name(name, severity)}", data_dir)
    except SourceError as e:
        raise UsageError("corruption_backend", e.reason) from None


def _default_output(f, classifier):
    from advprop_tf.paths import basename, dirname, join

    if f.model_dir:
        return join(f.model_dir, f"evaluation_{classifier.description['domain']}.json")
    path = f.saved_model.rstrip("/")
    return join(dirname(path), f"evaluation_{basename(path)}.json")


def _is_dir(path, flag):
    import tensorflow as tf

    try:
        return tf.io.gfile.isdir(path)
    except tf.errors.OpError as e:
        raise UsageError(flag, f"cannot check {path!r}: {e.message.splitlines()[0]}") from None


def _is_file(path, flag):
    import tensorflow as tf

    try:
        return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)
    except tf.errors.OpError as e:
        raise UsageError(flag, f"cannot check {path!r}: {e.message.splitlines()[0]}") from None


def fail(message):
    cli.fail("advprop_tf.evaluate", message)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags are written --name=value")
    from advprop_tf.evaluation import results_table

    try:
        results, output = run(FLAGS, log=lambda line: print(line, file=sys.stderr, flush=True))
    except ConfigError as e:
        cli.fail_setting("advprop_tf.evaluate", e)
    print(results_table(results))
    print(f"results: {output}")


# What `--help` lists under each title.
FLAG_GROUPS = {
    "what to evaluate": ["model_dir", "saved_model", "domain", "use_ema"],
    "data": ["dataset", "data_dir", "split", "holdout_fraction", "num_classes", "synthetic_examples", "eval_crop",
             "label_subset", "batch_size", "max_batches"],
    "attack": ["attack", "epsilon", "num_steps", "step_size", "targeted", "random_start", "restarts", "seed"],
    "batch norm": ["bn_mode"],
    "corruptions": ["corruptions", "corruption_backend", "severities", "reference_results"],
    "output": ["output"],
}

if __name__ == "__main__":
    define_flags()
    cli.run(main, "advprop_tf.evaluate", usage=__doc__, groups=FLAG_GROUPS)
