"""What every network of the registry shares: raw-pixel input, BN domains, a classifier head.

A network subclass builds its layers and defines `features()` (pooled
penultimate features), `weighted_layers()` (every layer holding weights, in the
order the network applies them: weight copying pairs layers by this order) and
`get_config()`. Everything that trains, evaluates, exports or copies weights
talks to this interface only, so it never needs to know the family.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import tensorflow as tf

from advprop_tf.domains import DEFAULT_DOMAINS
from advprop_tf.models.multi_bn import MultiBatchNormalization

# Per-channel statistics of ImageNet in pixel units (0-255).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
# imagenet: (x - mean) / std (Keras' "torch" mode); inception: x / 127.5 - 1 (Keras' "tf" mode, AdvProp's
# checkpoints); caffe: BGR channels minus their means (Keras' ResNet50, VGG); none: the network normalizes itself
# (Keras' EfficientNet and EfficientNetV2 have it built in).
INPUT_NORMALIZATIONS = ("imagenet", "inception", "caffe", "none")


def normalize_pixels(pixels, mode: str):
    """Map float pixels in [0, 255] to the network's input range."""
    pixels = tf.cast(pixels, tf.float32)
    if mode == "imagenet":
        return (pixels - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
    if mode == "inception":
        return pixels * (2.0 / 255.0) - 1.0
    if mode == "caffe":
        return pixels[..., ::-1] - tf.constant(CAFFE_BGR_MEAN)
    if mode == "none":
        return pixels
    raise ValueError(f"input_normalization must be one of {INPUT_NORMALIZATIONS}, got {mode!r}")


def check_input_normalization(mode: str) -> None:
    if mode not in INPUT_NORMALIZATIONS:
        raise ValueError(f"input_normalization must be one of {INPUT_NORMALIZATIONS}, got {mode!r}")


def round_filters(filters: int, width_coefficient: float, divisor: int = 8) -> int:
    """Scale a channel count by width and round to a multiple of `divisor` (the authors' EfficientNet rule)."""
    filters *= width_coefficient
    new_filters = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new_filters < 0.9 * filters:
        new_filters += divisor
    return int(new_filters)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
    return int(math.ceil(depth_coefficient * repeats))


class WeightsByPath(tf.Module):
    """Every weight of a Keras model by its path, for tf.train.Checkpoint (tracked as "model_weights").

    Keras 3 shows tf.train.Checkpoint only a layer's direct attributes: layers
    held in a list (our blocks) and variables held in a dict (each BN domain's)
    are not followed, so `Checkpoint(model=model)` alone saves a handful of
    variables. Trainable ones were still saved through the optimizer's
    references and the rest through the EMA's, which hid it until a run
    without EMA lost its BN statistics. This module names every one of them.
    """

    def __init__(self, model):
        super().__init__(name="model_weights")
        self.by_path = {v.path: v for v in model.weights}


class MultiDomainNetwork(keras.Model):
    """Base of the registry's networks.

    call(pixels, training=None, domain=None, bn_mode=None):
      pixels: float NHWC in [0, 255], any spatial size.
      domain: None (main domain), a domain name, or a tuple of names that
        splits the batch into equal consecutive chunks.
      bn_mode: None (follows `training`), "train", "batch" or "inference".
    The options every family takes are set here, each defaulting to the
    variant's row of the family's `variant_defaults(name)` (width, depth,
    resolution, dropout, drop connect) or to the class's BN_MOMENTUM and
    BN_EPSILON; a subclass then builds its layers, including head_dropout (a
    SeededDropout or None) and classifier.
    """

    BN_MOMENTUM = 0.99
    BN_EPSILON = 1e-3

    @classmethod
    def variant_defaults(cls, model_name: str) -> tuple:
        """(width, depth, resolution, dropout, drop connect) of a variant; ValueError for an unknown one."""
        raise ValueError(f"{cls.__name__} has no variant {model_name!r}")

    def __init__(
        self,
        model_name: str,
        num_classes: int = 1000,
        domains: Sequence[str] = DEFAULT_DOMAINS,
        input_normalization: str = "imagenet",
        resolution: int | None = None,
        width_coefficient: float | None = None,
        depth_coefficient: float | None = None,
        dropout_rate: float | None = None,
        drop_connect_rate: float | None = None,
        bn_momentum: float | None = None,
        bn_epsilon: float | None = None,
        synchronized_bn: bool = False,
        **kwargs,
    ):
        width, depth, default_resolution, default_dropout, default_drop_connect = self.variant_defaults(model_name)
        check_input_normalization(input_normalization)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        kwargs.setdefault("name", model_name.replace("-", "_"))
        super().__init__(**kwargs)
        self.model_name = model_name
        self.num_classes = int(num_classes)
        self.domains = tuple(domains)
        self.input_normalization = input_normalization
        self.resolution = int(resolution or default_resolution)
        self.width_coefficient = float(width if width_coefficient is None else width_coefficient)
        self.depth_coefficient = float(depth if depth_coefficient is None else depth_coefficient)
        self.dropout_rate = float(default_dropout if dropout_rate is None else dropout_rate)
        self.drop_connect_rate = float(default_drop_connect if drop_connect_rate is None else drop_connect_rate)
        self.bn_momentum = float(self.BN_MOMENTUM if bn_momentum is None else bn_momentum)
        self.bn_epsilon = float(self.BN_EPSILON if bn_epsilon is None else bn_epsilon)
        self.synchronized_bn = bool(synchronized_bn)

    def get_config(self):
        return {
            "name": self.name, "model_name": self.model_name, "num_classes": self.num_classes,
            "domains": list(self.domains), "input_normalization": self.input_normalization,
            "resolution": self.resolution, "width_coefficient": self.width_coefficient,
            "depth_coefficient": self.depth_coefficient, "dropout_rate": self.dropout_rate,
            "drop_connect_rate": self.drop_connect_rate, "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon, "synchronized_bn": self.synchronized_bn,
        }

    @property
    def main_domain(self) -> str:
        return self.domains[0]

    def bn_layers(self):
        """Every MultiBatchNormalization, in network order."""
        return [layer for layer in self.weighted_layers() if isinstance(layer, MultiBatchNormalization)]

    def weight_decay_variables(self):
        """The variables L2 weight decay applies to (default: every trainable one but BN gamma/beta)."""
        bn_ids = {id(v) for layer in self.bn_layers() for v in layer.weights}
        return [v for v in self.trainable_variables if id(v) not in bn_ids]

    def normalized_input(self, pixels):
        return tf.cast(normalize_pixels(pixels, self.input_normalization), self.compute_dtype)

    def call(self, inputs, training=None, domain=None, bn_mode=None):
        x = self.features(inputs, training=training, domain=domain, bn_mode=bn_mode)
        if self.head_dropout is not None:
            x = self.head_dropout(x, training=training)
        # Logits in float32 even under mixed precision (stable softmax/loss).
        return tf.cast(self.classifier(x), tf.float32)

    @classmethod
    def from_config(cls, config):
        model = cls(**config)
        model.build_weights()
        return model

    def build(self, input_shape=None):
        """Create every variable by running `call` once, eagerly, on a tiny batch (weights do not depend on
        size). Keras' default build traces the whole network into a scratch graph instead: 4-5x slower (an
        EfficientNet-B5 took 28 s to build that way)."""
        with tf.init_scope():  # eager even when the first call is traced
            self.call(tf.zeros([1, 32, 32, 3]), training=False)

    def build_weights(self):
        """Every variable, created now rather than at the first call."""
        if not self.built or not self.weights:
            self.build((None, 32, 32, 3))
        return self
