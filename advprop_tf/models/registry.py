"""Model names -> network classes: the one place that knows which families exist.

Training, evaluation, export, checkpoint initialization and the tools build
and rebuild networks through `build_model` / `model_from_config` only.
"""

from __future__ import annotations

from advprop_tf.models import keras_conversion
from advprop_tf.models.efficientnet import EFFICIENTNET_NAMES, EfficientNet
from advprop_tf.models.resnet import RESNET_NAMES, ResNet

_CLASSES = {**{name: EfficientNet for name in EFFICIENTNET_NAMES}, **{name: ResNet for name in RESNET_NAMES}}
MODEL_NAMES = tuple(_CLASSES)
# What --input_normalization defaults to: AdvProp's EfficientNet checkpoints use [-1, 1], the
# authors' ResNets ImageNet mean/std.
DEFAULT_INPUT_NORMALIZATION = {EfficientNet: "inception", ResNet: "imagenet"}


def is_keras_name(name: str) -> bool:
    """keras:<keras.applications constructor>, or keras:<model name> of a converted user network."""
    return name.startswith(keras_conversion.PREFIX)


def check_model_name(name: str) -> None:
    """ValueError for a name that builds no network."""
    if name in _CLASSES:
        return
    if is_keras_name(name):
        constructor = name[len(keras_conversion.PREFIX):]
        if constructor not in keras_conversion.application_names():
            raise ValueError(f"keras.applications has no {constructor!r}; valid: keras:"
                             f"{', keras:'.join(keras_conversion.application_names())}")
        return
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}, or keras:<a keras.applications "
                     "constructor>, e.g. keras:ResNet50")


def model_class(name: str):
    if is_keras_name(name):
        return keras_conversion.KerasNetwork
    check_model_name(name)
    return _CLASSES[name]


def default_input_normalization(name: str) -> str | None:
    """The family's input normalization (None for keras:<name>: its own preprocess_input decides)."""
    if is_keras_name(name):
        return None
    return DEFAULT_INPUT_NORMALIZATION[model_class(name)]


KERAS_OPTIONS = ("num_classes", "domains", "input_normalization", "resolution", "dropout_rate", "weights")


def build_model(name: str, weights: str | None = None, **options):
    """A network of the registry with all variables created; `options` as its class takes them. keras:<name>
    takes num_classes, domains, input_normalization, resolution, dropout_rate and `weights` (None, "imagenet"
    or a weight file of the constructor's network without its top); other options must be None."""
    if is_keras_name(name):
        fixed = {k: v for k, v in options.items() if k not in KERAS_OPTIONS and v not in (None, False)}
        if fixed:
            raise ValueError(f"{name}: a keras.applications network takes no {', '.join(sorted(fixed))}")
        return keras_conversion.build_application(
            name[len(keras_conversion.PREFIX):], weights=weights,
            **{k: v for k, v in options.items() if k in KERAS_OPTIONS})
    if weights is not None:
        raise ValueError(f"{name}: weights come from --init_checkpoint for the registry's own networks")
    return model_class(name)(model_name=name, **options).build_weights()


def model_from_config(config: dict):
    """Rebuild a network from its get_config() (as run_config.json records it)."""
    return model_class(config["model_name"]).from_config(dict(config))
