"""Copy weights of `keras.applications.EfficientNetBn` into our EfficientNet.

Keras' EfficientNet is the same network as the authors' for even input sizes
(its explicit zero padding reproduces TF "same" padding there), so its weights
map one to one, layer by layer, onto ours. Its input normalization layer is
not copied: our model normalizes pixels itself ("imagenet" mean/std matches
Keras' ImageNet weights).
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np

from advprop_tf.models.efficientnet import EfficientNet
from advprop_tf.models.multi_bn import MultiBatchNormalization

KERAS_APPLICATIONS = {
    "efficientnet-b0": "EfficientNetB0",
    "efficientnet-b1": "EfficientNetB1",
    "efficientnet-b2": "EfficientNetB2",
    "efficientnet-b3": "EfficientNetB3",
    "efficientnet-b4": "EfficientNetB4",
    "efficientnet-b5": "EfficientNetB5",
    "efficientnet-b6": "EfficientNetB6",
    "efficientnet-b7": "EfficientNetB7",
}

_KERAS_WEIGHTED_TYPES = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.BatchNormalization,
    keras.layers.Dense,
)


def keras_weighted_layers(keras_model) -> list:
    """Layers of a Keras EfficientNet that map onto ours, in network order."""
    return [
        layer for layer in keras_model.layers
        if isinstance(layer, _KERAS_WEIGHTED_TYPES) and layer.weights
    ]


def copy_keras_application_weights(
    keras_model, model: EfficientNet, domains: Sequence[str] | None = None, skip_head: bool = False
) -> None:
    """Copy every weight of `keras_model` into `model`.

    BN weights go to each of `domains` (default: all of the model's domains, so
    auxiliary BNs start as copies of the main one). `skip_head` leaves the
    classifier alone (and accepts a Keras model built without its top).
    Raises ValueError naming the first layer whose kind or shape does not match.
    """
    domains = tuple(model.domains if domains is None else domains)
    source = keras_weighted_layers(keras_model)
    target = model.weighted_layers()
    if skip_head:
        source = [layer for layer in source if not isinstance(layer, keras.layers.Dense)]
        target = [layer for layer in target if layer is not model.classifier]
    if len(source) != len(target):
        raise ValueError(
            f"{keras_model.name} has {len(source)} weighted layers, "
            f"{model.model_name} has {len(target)}: not the same architecture"
        )
    for src, dst in zip(source, target):
        values = [np.asarray(w) for w in src.get_weights()]
        if isinstance(dst, MultiBatchNormalization):
            if not isinstance(src, keras.layers.BatchNormalization):
                raise ValueError(f"layer {src.name} is not a BN but {dst.path} is")
            for domain in domains:
                variables = dst.domain_variables(domain)
                for key, value in zip(
                    ("gamma", "beta", "moving_mean", "moving_variance"), values
                ):
                    _assign(variables[key], value, src.name)
        else:
            if type(src) is not type(dst) or len(values) != len(dst.weights):
                raise ValueError(f"layer {src.name} does not match {dst.path}")
            for variable, value in zip(dst.weights, values):
                _assign(variable, value, src.name)


def _assign(variable, value, source_name):
    if tuple(variable.shape) != value.shape:
        raise ValueError(
            f"shape mismatch for {variable.path}: ours {tuple(variable.shape)}, "
            f"{source_name} has {value.shape}"
        )
    variable.assign(value)
