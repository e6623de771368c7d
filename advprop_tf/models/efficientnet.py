"""EfficientNet B0-B8 and L2 as in the authors' builder, with multi-domain BN.

Numbers (scaling table, stage table, rounding, initializers, BN momentum and
epsilon, drop connect) follow tensorflow/tpu models/official/efficientnet;
see FACTS.md. Every BN is a `MultiBatchNormalization`, and `domain=` /
`bn_mode=` given to the model reach every one of them.

The model eats raw float32 pixels in [0, 255] and normalizes them itself, so
attacks work in pixel units and the exported model takes what a user has.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import keras
import tensorflow as tf

from advprop_tf.models.multi_bn import MultiBatchNormalization

# name: (width_coefficient, depth_coefficient, resolution, dropout_rate)
SCALING = {
    "efficientnet-b0": (1.0, 1.0, 224, 0.2),
    "efficientnet-b1": (1.0, 1.1, 240, 0.2),
    "efficientnet-b2": (1.1, 1.2, 260, 0.3),
    "efficientnet-b3": (1.2, 1.4, 300, 0.3),
    "efficientnet-b4": (1.4, 1.8, 380, 0.4),
    "efficientnet-b5": (1.6, 2.2, 456, 0.4),
    "efficientnet-b6": (1.8, 2.6, 528, 0.5),
    "efficientnet-b7": (2.0, 3.1, 600, 0.5),
    "efficientnet-b8": (2.2, 3.6, 672, 0.5),
    "efficientnet-l2": (4.3, 5.3, 800, 0.5),
}
MODEL_NAMES = tuple(SCALING)


@dataclasses.dataclass(frozen=True)
class StageArgs:
    repeats: int
    kernel_size: int
    strides: int
    expand_ratio: int
    input_filters: int
    output_filters: int
    se_ratio: float = 0.25


# The seven stages of B0; other variants scale filters and repeats.
B0_STAGES = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)

# Per-channel statistics of ImageNet in pixel units (0-255).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
INPUT_NORMALIZATIONS = ("imagenet", "inception")


def round_filters(filters: int, width_coefficient: float, divisor: int = 8) -> int:
    """Scale a filter count by width and round to a multiple of `divisor`."""
    filters *= width_coefficient
    new_filters = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new_filters < 0.9 * filters:
        new_filters += divisor
    return int(new_filters)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
    return int(math.ceil(depth_coefficient * repeats))


def normalize_pixels(pixels, mode: str):
    """Map float pixels in [0, 255] to the network's input range."""
    pixels = tf.cast(pixels, tf.float32)
    if mode == "imagenet":
        return (pixels - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
    if mode == "inception":
        return pixels * (2.0 / 255.0) - 1.0
    raise ValueError(
        f"input_normalization must be one of {INPUT_NORMALIZATIONS}, got {mode!r}"
    )


# The authors' initializers: normal(0, sqrt(2 / fan_out)) for convs
# (fan_out = kh * kw * out_filters; for depthwise kh * kw), and
# uniform(+-1/sqrt(num_classes)) for the dense layer.
def conv_initializer():
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def dense_initializer():
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_out", "uniform")


@keras.saving.register_keras_serializable(package="advprop_tf")
class MBConvBlock(keras.layers.Layer):
    """Mobile inverted bottleneck with squeeze-excitation and drop connect."""

    def __init__(
        self,
        input_filters: int,
        output_filters: int,
        kernel_size: int,
        strides: int,
        expand_ratio: int,
        se_ratio: float,
        drop_rate: float,
        domains: Sequence[str],
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-3,
        synchronized_bn: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.input_filters = input_filters
        self.output_filters = output_filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.expand_ratio = expand_ratio
        self.se_ratio = se_ratio
        self.drop_rate = drop_rate
        self.domains = tuple(domains)
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.synchronized_bn = synchronized_bn
        self.id_skip = strides == 1 and input_filters == output_filters

        def bn(name):
            return MultiBatchNormalization(
                domains, bn_momentum, bn_epsilon, synchronized_bn, name=name
            )

        expanded = input_filters * expand_ratio
        if expand_ratio != 1:
            self.expand_conv = keras.layers.Conv2D(
                expanded, 1, padding="same", use_bias=False,
                kernel_initializer=conv_initializer(), name="expand_conv",
            )
            self.expand_bn = bn("expand_bn")
        self.depthwise_conv = keras.layers.DepthwiseConv2D(
            kernel_size, strides, padding="same", use_bias=False,
            depthwise_initializer=conv_initializer(), name="depthwise_conv",
        )
        self.depthwise_bn = bn("depthwise_bn")
        if se_ratio and 0 < se_ratio <= 1:
            squeezed = max(1, int(input_filters * se_ratio))
            self.se_reduce = keras.layers.Conv2D(
                squeezed, 1, padding="same", activation="swish",
                kernel_initializer=conv_initializer(), name="se_reduce",
            )
            self.se_expand = keras.layers.Conv2D(
                expanded, 1, padding="same", activation="sigmoid",
                kernel_initializer=conv_initializer(), name="se_expand",
            )
        else:
            self.se_reduce = None
        self.project_conv = keras.layers.Conv2D(
            output_filters, 1, padding="same", use_bias=False,
            kernel_initializer=conv_initializer(), name="project_conv",
        )
        self.project_bn = bn("project_bn")
        # One draw per sample: the whole residual branch is dropped or kept.
        if self.id_skip and drop_rate > 0:
            self.drop_connect = keras.layers.Dropout(
                drop_rate, noise_shape=(None, 1, 1, 1), name="drop_connect"
            )
        else:
            self.drop_connect = None

    def weighted_layers(self):
        """Layers holding weights, in the order the network applies them."""
        layers = []
        if self.expand_ratio != 1:
            layers += [self.expand_conv, self.expand_bn]
        layers += [self.depthwise_conv, self.depthwise_bn]
        if self.se_reduce is not None:
            layers += [self.se_reduce, self.se_expand]
        return layers + [self.project_conv, self.project_bn]

    def call(self, inputs, training=None, domain=None, bn_mode=None):
        bn_kwargs = dict(training=training, domain=domain, bn_mode=bn_mode)
        x = inputs
        if self.expand_ratio != 1:
            x = tf.nn.silu(self.expand_bn(self.expand_conv(x), **bn_kwargs))
        x = tf.nn.silu(self.depthwise_bn(self.depthwise_conv(x), **bn_kwargs))
        if self.se_reduce is not None:
            squeezed = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
            x = x * self.se_expand(self.se_reduce(squeezed))
        x = self.project_bn(self.project_conv(x), **bn_kwargs)
        if self.id_skip:
            if self.drop_connect is not None:
                x = self.drop_connect(x, training=training)
            x = x + inputs
        return x

    def get_config(self):
        config = super().get_config()
        config.update(
            input_filters=self.input_filters,
            output_filters=self.output_filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            expand_ratio=self.expand_ratio,
            se_ratio=self.se_ratio,
            drop_rate=self.drop_rate,
            domains=list(self.domains),
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            synchronized_bn=self.synchronized_bn,
        )
        return config


@keras.saving.register_keras_serializable(package="advprop_tf")
class EfficientNet(keras.Model):
    """EfficientNet whose every BN is a MultiBatchNormalization.

    call(pixels, training=None, domain=None, bn_mode=None):
      pixels: float NHWC in [0, 255], any spatial size.
      domain: None (main domain), a domain name, or a tuple of names that
        splits the batch into equal consecutive chunks.
      bn_mode: None (follows `training`), "train", "batch" or "inference".
    """

    def __init__(
        self,
        model_name: str = "efficientnet-b0",
        num_classes: int = 1000,
        domains: Sequence[str] = ("clean", "adv"),
        input_normalization: str = "imagenet",
        resolution: int | None = None,
        width_coefficient: float | None = None,
        depth_coefficient: float | None = None,
        dropout_rate: float | None = None,
        drop_connect_rate: float = 0.2,
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-3,
        synchronized_bn: bool = False,
        **kwargs,
    ):
        if model_name not in SCALING:
            raise ValueError(
                f"unknown model name {model_name!r}; valid names: {', '.join(MODEL_NAMES)}"
            )
        if input_normalization not in INPUT_NORMALIZATIONS:
            raise ValueError(
                f"input_normalization must be one of {INPUT_NORMALIZATIONS}, "
                f"got {input_normalization!r}"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        kwargs.setdefault("name", model_name.replace("-", "_"))
        super().__init__(**kwargs)
        width, depth, default_res, default_dropout = SCALING[model_name]
        self.model_name = model_name
        self.num_classes = int(num_classes)
        self.domains = tuple(domains)
        self.input_normalization = input_normalization
        self.resolution = int(resolution or default_res)
        self.width_coefficient = float(width if width_coefficient is None else width_coefficient)
        self.depth_coefficient = float(depth if depth_coefficient is None else depth_coefficient)
        self.dropout_rate = float(default_dropout if dropout_rate is None else dropout_rate)
        self.drop_connect_rate = float(drop_connect_rate)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.synchronized_bn = bool(synchronized_bn)

        def bn(name):
            return MultiBatchNormalization(
                self.domains, self.bn_momentum, self.bn_epsilon,
                self.synchronized_bn, name=name,
            )

        def filters(f):
            return round_filters(f, self.width_coefficient)

        self.stem_conv = keras.layers.Conv2D(
            filters(32), 3, 2, padding="same", use_bias=False,
            kernel_initializer=conv_initializer(), name="stem_conv",
        )
        self.stem_bn = bn("stem_bn")

        stages = [
            dataclasses.replace(
                s,
                input_filters=filters(s.input_filters),
                output_filters=filters(s.output_filters),
                repeats=round_repeats(s.repeats, self.depth_coefficient),
            )
            for s in B0_STAGES
        ]
        total_blocks = sum(s.repeats for s in stages)
        self.blocks = []
        for stage in stages:
            for i in range(stage.repeats):
                index = len(self.blocks)
                self.blocks.append(
                    MBConvBlock(
                        input_filters=stage.input_filters if i == 0 else stage.output_filters,
                        output_filters=stage.output_filters,
                        kernel_size=stage.kernel_size,
                        strides=stage.strides if i == 0 else 1,
                        expand_ratio=stage.expand_ratio,
                        se_ratio=stage.se_ratio,
                        drop_rate=self.drop_connect_rate * index / total_blocks,
                        domains=self.domains,
                        bn_momentum=self.bn_momentum,
                        bn_epsilon=self.bn_epsilon,
                        synchronized_bn=self.synchronized_bn,
                        name=f"blocks_{index}",
                    )
                )

        self.head_conv = keras.layers.Conv2D(
            filters(1280), 1, padding="same", use_bias=False,
            kernel_initializer=conv_initializer(), name="head_conv",
        )
        self.head_bn = bn("head_bn")
        self.head_dropout = (
            keras.layers.Dropout(self.dropout_rate, name="head_dropout")
            if self.dropout_rate > 0 else None
        )
        self.classifier = keras.layers.Dense(
            self.num_classes, kernel_initializer=dense_initializer(),
            bias_initializer="zeros", name="classifier",
        )

    @property
    def main_domain(self) -> str:
        return self.domains[0]

    def weighted_layers(self):
        """Every layer holding weights, in the order the network applies them."""
        layers = [self.stem_conv, self.stem_bn]
        for block in self.blocks:
            layers.extend(block.weighted_layers())
        return layers + [self.head_conv, self.head_bn, self.classifier]

    def bn_layers(self):
        """Every MultiBatchNormalization, in network order."""
        return [
            layer for layer in self.weighted_layers()
            if isinstance(layer, MultiBatchNormalization)
        ]

    def features(self, pixels, training=None, domain=None, bn_mode=None):
        """Pooled penultimate features (before dropout and classifier)."""
        bn_kwargs = dict(training=training, domain=domain, bn_mode=bn_mode)
        x = normalize_pixels(pixels, self.input_normalization)
        x = tf.cast(x, self.compute_dtype)
        x = tf.nn.silu(self.stem_bn(self.stem_conv(x), **bn_kwargs))
        for block in self.blocks:
            x = block(x, **bn_kwargs)
        x = tf.nn.silu(self.head_bn(self.head_conv(x), **bn_kwargs))
        return tf.reduce_mean(x, axis=[1, 2])

    def call(self, inputs, training=None, domain=None, bn_mode=None):
        x = self.features(inputs, training=training, domain=domain, bn_mode=bn_mode)
        if self.head_dropout is not None:
            x = self.head_dropout(x, training=training)
        # Logits in float32 even under mixed precision (stable softmax/loss).
        return tf.cast(self.classifier(x), tf.float32)

    def get_config(self):
        return {
            "name": self.name,
            "model_name": self.model_name,
            "num_classes": self.num_classes,
            "domains": list(self.domains),
            "input_normalization": self.input_normalization,
            "resolution": self.resolution,
            "width_coefficient": self.width_coefficient,
            "depth_coefficient": self.depth_coefficient,
            "dropout_rate": self.dropout_rate,
            "drop_connect_rate": self.drop_connect_rate,
            "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon,
            "synchronized_bn": self.synchronized_bn,
        }

    @classmethod
    def from_config(cls, config):
        model = cls(**config)
        model.build_weights()
        return model

    def build_weights(self):
        """Create every variable with one tiny forward pass (weights do not depend on size)."""
        if not self.built or not self.weights:
            self(tf.zeros([1, 32, 32, 3]), training=False)
        return self


def build_efficientnet(
    name: str,
    num_classes: int = 1000,
    domains: Sequence[str] = ("clean", "adv"),
    input_normalization: str = "imagenet",
    resolution: int | None = None,
    width_coefficient: float | None = None,
    depth_coefficient: float | None = None,
    dropout_rate: float | None = None,
    drop_connect_rate: float = 0.2,
    **kwargs,
) -> EfficientNet:
    """Build an EfficientNet with all variables created.

    `resolution`, `width_coefficient`, `depth_coefficient` and `dropout_rate`
    default to the variant's row of the scaling table.
    """
    model = EfficientNet(
        model_name=name,
        num_classes=num_classes,
        domains=domains,
        input_normalization=input_normalization,
        resolution=resolution,
        width_coefficient=width_coefficient,
        depth_coefficient=depth_coefficient,
        dropout_rate=dropout_rate,
        drop_connect_rate=drop_connect_rate,
        **kwargs,
    )
    return model.build_weights()
