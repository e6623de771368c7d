"""Convert the authors' TF1 EfficientNet / AdvProp checkpoints, or Keras .h5 weights, into a run directory.

The output directory (run_config.json + checkpoints/ckpt-0 with the model and
an EMA equal to it) is what `train --init_checkpoint`, `export` and
`evaluate --model_dir` read. tools/convert_checkpoint.py is the command line.
"""

from __future__ import annotations

import tensorflow as tf

from advprop_tf.domains import MAIN
from advprop_tf.errors import ConfigError


class ConvertError(ConfigError):
    """A bad request; `field` names the setting."""


def resolve_source(path):
    from advprop_tf.training.initialization import InitError, resolve_checkpoint

    if path.endswith(".h5"):
        if tf.io.gfile.isdir(path) or not tf.io.gfile.exists(path):
            raise ConvertError("source", f"{path!r} does not exist")
        return path
    try:
        return resolve_checkpoint(path)[0]
    except InitError as e:
        raise ConvertError("source", e.reason) from None


def convert(source: str, model_name: str, output: str, inception_normalization: bool = False, use_ema: bool = True,
            num_classes: int | None = None, resolution: int | None = None,
            width_coefficient: float | None = None, depth_coefficient: float | None = None,
            export_saved_model: bool = False) -> str:
    """Convert `source` into the directory `output`; returns a summary. Raises ConvertError."""
    from advprop_tf.serving import export
    from advprop_tf.training.run_dir import RUN_CONFIG, RunDir, checkpoint_reader, make_run_config
    from advprop_tf.models import EFFICIENTNET_NAMES, build_efficientnet
    from advprop_tf.models.base import WeightsByPath
    from advprop_tf.models.authors_checkpoint import CheckpointMismatch, checkpoint_scopes, load_authors_checkpoint
    from advprop_tf.training.ema import ExponentialMovingAverage

    for flag, value in (("source", source), ("model", model_name), ("output", output)):
        if not value:
            raise ConvertError(flag, "is required")
    if model_name not in EFFICIENTNET_NAMES:
        raise ConvertError("model", f"the authors' checkpoints are EfficientNets, not {model_name!r}; "
                           f"valid: {', '.join(EFFICIENTNET_NAMES)}")
    run_dir = RunDir(output)
    if run_dir.latest_checkpoint():
        raise ConvertError("output", f"{output!r} already holds a checkpoint; not overwriting it")
    requested = source
    source = resolve_source(source)

    def build(classes, input_normalization):
        return build_efficientnet(
            model_name, num_classes=classes, domains=(MAIN,), input_normalization=input_normalization,
            resolution=resolution, width_coefficient=width_coefficient, depth_coefficient=depth_coefficient,
        )

    if source.endswith(".h5"):
        from advprop_tf.training.initialization import InitError, keras_application_model

        if inception_normalization:
            raise ConvertError("inception_normalization", "Keras applications weights are the baseline ones "
                               "(ImageNet mean/std)")
        model = build(num_classes or 1000, "imagenet")
        try:
            keras_application_model(source, model, skip_head=False)
        except InitError as e:
            raise ConvertError("source", e.reason) from None
        summary = f"copied every layer of {source}"
    else:
        shapes = checkpoint_reader(source).get_variable_to_shape_map()
        scopes = checkpoint_scopes(shapes)
        if model_name not in scopes:
            raise ConvertError("model", f"{source} holds {', '.join(scopes) or 'no EfficientNet'}, not {model_name}")
        head = shapes.get(f"{model_name}/head/dense/bias")
        num_classes = num_classes or (int(head[0]) if head else 1000)
        model = build(num_classes, "inception" if inception_normalization else "imagenet")
        try:
            report = load_authors_checkpoint(model, source, scope=model_name, use_ema=use_ema)
        except CheckpointMismatch as e:
            raise ConvertError("source", str(e)) from None
        summary = f"loaded {report.loaded} variables ({report.from_ema} from EMA shadows) from {source}"
        if report.without_ema:
            summary += f"\nno EMA shadow, raw value used: {', '.join(report.without_ema)}"
        if report.unused:
            summary += f"\nunused checkpoint variables (not optimizer slots): {', '.join(report.unused)}"

    run_dir.write_json(RUN_CONFIG, make_run_config(model, [], "converted", None,
                                                   {"source": requested, "use_ema": use_ema}))
    ema = ExponentialMovingAverage(model)  # shadows = the converted values: export/evaluate read them
    path = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, model_weights=WeightsByPath(model), ema=ema), run_dir.checkpoint_dir, 1).save(
        checkpoint_number=0)
    summary += (f"\nwrote {path} ({model.model_name}, {model.num_classes} classes, "
                f"input normalization {model.input_normalization})")
    if export_saved_model:
        summary += f"\nexported {export(output, run_dir.export_dir)}"
    return summary
