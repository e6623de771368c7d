"""Model names -> network classes: the one place that knows which families exist.

Training, evaluation, export, checkpoint initialization and the tools build
and rebuild networks through `build_model` / `model_from_config` only.
"""

from __future__ import annotations

from advprop_tf.models.efficientnet import EFFICIENTNET_NAMES, EfficientNet
from advprop_tf.models.resnet import RESNET_NAMES, ResNet

_CLASSES = {**{name: EfficientNet for name in EFFICIENTNET_NAMES}, **{name: ResNet for name in RESNET_NAMES}}
MODEL_NAMES = tuple(_CLASSES)
# What --input_normalization defaults to: AdvProp's EfficientNet checkpoints use [-1, 1], the
# authors' ResNets ImageNet mean/std.
DEFAULT_INPUT_NORMALIZATION = {EfficientNet: "inception", ResNet: "imagenet"}


def model_class(name: str):
    try:
        return _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}") from None


def default_input_normalization(name: str) -> str:
    return DEFAULT_INPUT_NORMALIZATION[model_class(name)]


def build_model(name: str, **options):
    """A network of the registry with all variables created; `options` as its class takes them."""
    return model_class(name)(model_name=name, **options).build_weights()


def model_from_config(config: dict):
    """Rebuild a network from its get_config() (as run_config.json records it)."""
    return model_class(config["model_name"]).from_config(dict(config))
