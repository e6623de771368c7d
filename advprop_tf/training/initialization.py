"""--init_checkpoint: start training from pretrained weights instead of a random init.

Accepted sources, found by what the path holds:
  - a training or converted directory (run_config.json + checkpoints/), or a
    checkpoint prefix inside one: its EMA values when it has them;
  - an authors' TF1 checkpoint (tensorflow/tpu names, EMA shadows preferred);
  - a Keras applications EfficientNet weight file (.weights.h5 / .h5).
Each auxiliary BN of the model starts as a copy of the main BN (or of the
source's BN of the same domain, when it has one), so a plain pretrained
network can be fine-tuned with AdvProp. `skip_head` keeps the fresh
classifier, for a different number of classes.
"""

from __future__ import annotations

import tensorflow as tf

from advprop_tf.domains import MAIN
from advprop_tf.errors import ConfigError
from advprop_tf.models.base import MultiDomainNetwork
from advprop_tf.models.efficientnet import EfficientNet
from advprop_tf.paths import dirname, join
from advprop_tf.training.run_dir import RUN_CONFIG, RunDir, checkpoint_reader


class InitError(ConfigError):
    """The init checkpoint cannot initialize this model; `field` names the setting (init_checkpoint by default)."""

    def __init__(self, reason: str, field: str = "init_checkpoint"):
        super().__init__(field, reason)


def resolve_checkpoint(path: str):
    """(checkpoint prefix, run directory or None) of a directory or prefix; InitError if none."""
    if path.endswith(".index"):
        path = path[: -len(".index")]
    path = path.rstrip("/") or path
    if tf.io.gfile.isdir(path):
        if RunDir(path).exists(RUN_CONFIG):
            prefix = RunDir(path).latest_checkpoint()
            if prefix:
                return prefix, path
        prefix = tf.train.latest_checkpoint(path)
        if not prefix:
            indexes = sorted(tf.io.gfile.glob(join(path, "*.index")))
            prefix = indexes[-1][: -len(".index")] if len(indexes) == 1 else None
        if not prefix:
            raise InitError(f"no checkpoint in {path!r}")
        return prefix, _run_dir_of(prefix)
    if tf.io.gfile.exists(path + ".index"):
        return path, _run_dir_of(path)
    raise InitError(f"{path!r} is neither a directory, a checkpoint nor a .h5 file")


def _run_dir_of(prefix):
    """The run directory of <run>/checkpoints/ckpt-N, or None."""
    parent = dirname(dirname(prefix))
    return parent if RunDir(parent).exists(RUN_CONFIG) else None


def initialize_from(model: MultiDomainNetwork, path: str, skip_head: bool = False, use_ema: bool = True) -> str:
    """Fill `model` from `path`; returns a one-line description of what was loaded."""
    if path.endswith(".h5"):
        keras_application_model(path, model, skip_head)
        return f"Keras applications weights {path}" + (" (head skipped)" if skip_head else "")
    prefix, run_dir = resolve_checkpoint(path)
    names = set(checkpoint_reader(prefix).get_variable_to_shape_map())
    if run_dir is None:
        return _from_authors_checkpoint(model, prefix, names, skip_head, use_ema)
    from advprop_tf.training.trained import load_trained

    try:
        source, _, step, _ = load_trained(run_dir, use_ema=use_ema and any(n.startswith("ema/") for n in names))
    except ConfigError as e:  # the directory's problem, named as the flag that points at it
        raise InitError(e.reason) from None
    _copy(source, model, skip_head)
    return f"{prefix} (step {step}{', EMA' if use_ema else ''}{', head skipped' if skip_head else ''})"


def _copy(source, model, skip_head):
    from advprop_tf.models.transfer import copy_weights

    try:
        copy_weights(source, model, skip_head=skip_head)
    except ValueError as e:
        raise InitError(f"{e}") from None


def _from_authors_checkpoint(model, prefix, names, skip_head, use_ema):
    from advprop_tf.models.authors_checkpoint import CheckpointMismatch, checkpoint_scopes, load_authors_checkpoint

    scopes = checkpoint_scopes(names)
    if scopes and not isinstance(model, EfficientNet):
        raise InitError(f"{prefix!r} is an authors' EfficientNet checkpoint ({scopes[0]}); "
                        f"--model is {model.model_name}")
    if not scopes:
        raise InitError(f"{prefix!r} has no run_config.json beside it and no "
                        "authors' EfficientNet variables")
    # Read into a copy with the checkpoint's head, then copy (maybe without the head).
    head = checkpoint_reader(prefix).get_variable_to_shape_map().get(f"{scopes[0]}/head/dense/bias")
    config = dict(model.get_config(), domains=[MAIN], num_classes=int(head[0]) if head else model.num_classes)
    source = EfficientNet.from_config(config)
    try:
        report = load_authors_checkpoint(source, prefix, scope=scopes[0], use_ema=use_ema)
    except CheckpointMismatch as e:
        raise InitError(f"{e}") from None
    _copy(source, model, skip_head)
    return (f"authors' checkpoint {prefix} ({scopes[0]}, {report.from_ema} EMA values"
            f"{', head skipped' if skip_head else ''})")


def keras_application_model(path: str, model: MultiDomainNetwork, skip_head: bool) -> None:
    """Load a keras.applications EfficientNet weight file into `model` (all BN domains).

    The file's own input-normalization layer is NOT used: Keras' ImageNet
    weights expect ImageNet mean/std, and Keras only applies its variance fix
    when it downloads them itself. So `model` must normalize with "imagenet".
    """
    import keras

    from advprop_tf.models.keras_weights import KERAS_APPLICATIONS, copy_keras_application_weights

    if model.model_name not in KERAS_APPLICATIONS:
        raise InitError(f"keras.applications has no {model.model_name}")
    if model.input_normalization != "imagenet":
        raise InitError("Keras applications weights expect ImageNet mean/std; pass --input_normalization=imagenet",
                        field="input_normalization")
    if not tf.io.gfile.exists(path):
        raise InitError(f"{path!r} does not exist")
    constructor = getattr(keras.applications, KERAS_APPLICATIONS[model.model_name])
    size = model.resolution
    errors = []
    for include_top, classes in ((True, model.num_classes), (True, 1000), (False, 1000)):
        keras_model = constructor(weights=None, include_top=include_top, classes=classes,
                                  input_shape=(size, size, 3))
        try:
            keras_model.load_weights(path)
        except Exception as e:  # wrong head size or no head: try the next layout
            message = str(e)
            errors.append(message.splitlines()[0])
            continue
        head_matches = include_top and classes == model.num_classes
        if not head_matches and not skip_head:
            found = f"a {classes}-class head" if include_top else f"no {model.num_classes}-class head"
            raise InitError(f"{path!r} has {found}, the model has {model.num_classes} "
                            "classes; pass --init_skip_head to train a new head")
        try:
            copy_keras_application_weights(keras_model, model, skip_head=skip_head or not head_matches)
        except ValueError as e:
            raise InitError(f"{e}") from None
        return
    raise InitError(f"{path!r} is not a {KERAS_APPLICATIONS[model.model_name]} weight file "
                    f"({errors[-1]})")
