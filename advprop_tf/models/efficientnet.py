"""EfficientNet B0-B8 and L2 as in the authors' builder, with multi-domain BN.

Numbers (scaling table, stage table, rounding, initializers, BN momentum and
epsilon, drop connect) follow tensorflow/tpu models/official/efficientnet
(efficientnet_builder.py, efficientnet_model.py, utils.py). Every BN is a `MultiBatchNormalization`, and `domain=` /
`bn_mode=` given to the model reach every one of them.

The model eats raw float32 pixels in [0, 255] and normalizes them itself, so
attacks work in pixel units and the exported model takes what a user has.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import keras
import tensorflow as tf

from advprop_tf.models.base import MultiDomainNetwork, round_filters, round_repeats
from advprop_tf.models.dropout import SeededDropout
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
EFFICIENTNET_NAMES = tuple(SCALING)


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
            self.drop_connect = SeededDropout(
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
class EfficientNet(MultiDomainNetwork):
    """EfficientNet whose every BN is a MultiBatchNormalization (call: see MultiDomainNetwork)."""

    @classmethod
    def variant_defaults(cls, model_name):
        if model_name not in SCALING:
            raise ValueError(f"unknown model name {model_name!r}; valid names: {', '.join(EFFICIENTNET_NAMES)}")
        width, depth, resolution, dropout = SCALING[model_name]
        return width, depth, resolution, dropout, 0.2

    def __init__(self, model_name: str = "efficientnet-b0", **options):
        super().__init__(model_name, **options)

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
            SeededDropout(self.dropout_rate, name="head_dropout")
            if self.dropout_rate > 0 else None
        )
        self.classifier = keras.layers.Dense(
            self.num_classes, kernel_initializer=dense_initializer(),
            bias_initializer="zeros", name="classifier",
        )

    def weighted_layers(self):
        """Every layer holding weights, in the order the network applies them."""
        layers = [self.stem_conv, self.stem_bn]
        for block in self.blocks:
            layers.extend(block.weighted_layers())
        return layers + [self.head_conv, self.head_bn, self.classifier]

    def features(self, pixels, training=None, domain=None, bn_mode=None):
        """Pooled penultimate features (before dropout and classifier)."""
        bn_kwargs = dict(training=training, domain=domain, bn_mode=bn_mode)
        x = self.normalized_input(pixels)
        x = tf.nn.silu(self.stem_bn(self.stem_conv(x), **bn_kwargs))
        for block in self.blocks:
            x = block(x, **bn_kwargs)
        x = tf.nn.silu(self.head_bn(self.head_conv(x), **bn_kwargs))
        return tf.reduce_mean(x, axis=[1, 2])


def build_efficientnet(name: str, **options) -> EfficientNet:
    """An EfficientNet with all variables created; options as EfficientNet takes them (each defaults
    to the variant's row of the scaling table)."""
    return EfficientNet(name, **options).build_weights()
