"""ResNet-50 … ResNet-638 as in the authors' adversarial-training code, with multi-domain BN.

The network of facebookresearch/ImageNet-Adversarial-Training (resnet_model.py),
which "Intriguing Properties of Adversarial Training at Scale" trains with
separate clean/adversarial BNs and AdvProp's ResNet rows use:
  - bottleneck blocks, stride on the 3x3 conv (ResNet v1.5), convs without bias,
    TensorFlow "same" padding (torchvision pads strided convs symmetrically, so
    PyTorch weights would be shifted by a pixel);
  - a BN after every conv, each a MultiBatchNormalization; the last BN of each
    block starts with gamma = 0; the shortcut is a 1x1 conv + BN where the
    channel count changes;
  - He fan-out initialization (truncated normal, as TF1's variance scaling),
    final dense layer N(0, 0.01); BN momentum 0.9, epsilon 1e-5 (tensorpack).
Stage depths: 50/101/152/200 are the standard ones. The deeper networks of the
scaling study keep ResNet-200's first, second and last stages and deepen the
third (res4), as 101 and 152 do; the paper's exact stage depths were not
checked here.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from advprop_tf.models.base import MultiDomainNetwork, round_filters, round_repeats
from advprop_tf.models.dropout import SeededDropout
from advprop_tf.models.multi_bn import MultiBatchNormalization

STAGE_DEPTHS = {
    "resnet-50": (3, 4, 6, 3),
    "resnet-101": (3, 4, 23, 3),
    "resnet-152": (3, 8, 36, 3),
    "resnet-200": (3, 24, 36, 3),
    "resnet-338": (3, 24, 82, 3),
    "resnet-518": (3, 24, 142, 3),
    "resnet-638": (3, 24, 182, 3),
}
RESNET_NAMES = tuple(STAGE_DEPTHS)
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck width; a block outputs 4x
STEM_WIDTH = 64
DEFAULT_RESOLUTION = 224


def conv_initializer():
    return keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")


def conv(filters, kernel_size, strides=1, name=None):
    return keras.layers.Conv2D(filters, kernel_size, strides, padding="same", use_bias=False,
                               kernel_initializer=conv_initializer(), name=name)


@keras.saving.register_keras_serializable(package="advprop_tf")
class BottleneckBlock(keras.layers.Layer):
    """1x1 -> 3x3 (stride) -> 1x1 (4x), BN after each, projection shortcut when the shape changes."""

    def __init__(self, input_filters: int, filters: int, strides: int, domains: Sequence[str],
                 drop_rate: float = 0.0, bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                 synchronized_bn: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.input_filters = input_filters
        self.filters = filters
        self.strides = strides
        self.domains = tuple(domains)
        self.drop_rate = drop_rate
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.synchronized_bn = synchronized_bn

        def bn(name, gamma="ones"):
            return MultiBatchNormalization(domains, bn_momentum, bn_epsilon, synchronized_bn,
                                           gamma_initializer=gamma, name=name)

        self.conv1, self.bn1 = conv(filters, 1, name="conv1"), bn("bn1")
        self.conv2, self.bn2 = conv(filters, 3, strides, name="conv2"), bn("bn2")
        self.conv3, self.bn3 = conv(4 * filters, 1, name="conv3"), bn("bn3", gamma="zeros")
        # The authors project where the channel count changes, which in their networks is also
        # wherever the stride is 2; narrowed networks can keep the channels across a stride.
        self.projects = input_filters != 4 * filters or strides != 1
        if self.projects:
            self.shortcut_conv = conv(4 * filters, 1, strides, name="shortcut_conv")
            self.shortcut_bn = bn("shortcut_bn")
        # Stochastic depth (off by default): one draw per sample for the residual branch.
        self.drop_path = (SeededDropout(drop_rate, noise_shape=(None, 1, 1, 1), name="drop_path")
                          if drop_rate > 0 else None)

    def weighted_layers(self):
        layers = [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]
        return layers + ([self.shortcut_conv, self.shortcut_bn] if self.projects else [])

    def call(self, inputs, training=None, domain=None, bn_mode=None):
        bn_kwargs = dict(training=training, domain=domain, bn_mode=bn_mode)
        x = tf.nn.relu(self.bn1(self.conv1(inputs), **bn_kwargs))
        x = tf.nn.relu(self.bn2(self.conv2(x), **bn_kwargs))
        x = self.bn3(self.conv3(x), **bn_kwargs)
        if self.drop_path is not None:
            x = self.drop_path(x, training=training)
        shortcut = self.shortcut_bn(self.shortcut_conv(inputs), **bn_kwargs) if self.projects else inputs
        return tf.nn.relu(x + shortcut)

    def get_config(self):
        config = super().get_config()
        config.update(input_filters=self.input_filters, filters=self.filters, strides=self.strides,
                      domains=list(self.domains), drop_rate=self.drop_rate, bn_momentum=self.bn_momentum,
                      bn_epsilon=self.bn_epsilon, synchronized_bn=self.synchronized_bn)
        return config


@keras.saving.register_keras_serializable(package="advprop_tf")
class ResNet(MultiDomainNetwork):
    """Bottleneck ResNet (v1.5) whose every BN is a MultiBatchNormalization (call: see MultiDomainNetwork).

    width_coefficient scales every channel count (rounded to a multiple of 8),
    depth_coefficient every stage's block count (rounded up): for small runs.
    dropout_rate (before the classifier) and drop_connect_rate (stochastic depth,
    growing linearly to the last block) default to 0, as the authors.
    """

    BN_MOMENTUM = 0.9  # tensorpack's BatchNorm, as the authors
    BN_EPSILON = 1e-5

    @classmethod
    def variant_defaults(cls, model_name):
        if model_name not in STAGE_DEPTHS:
            raise ValueError(f"unknown model name {model_name!r}; valid names: {', '.join(RESNET_NAMES)}")
        return 1.0, 1.0, DEFAULT_RESOLUTION, 0.0, 0.0

    def __init__(self, model_name: str = "resnet-50", **options):
        super().__init__(model_name, **options)

        def width(channels):
            return round_filters(channels, self.width_coefficient)

        self.stem_conv = conv(width(STEM_WIDTH), 7, 2, name="stem_conv")
        self.stem_bn = MultiBatchNormalization(self.domains, self.bn_momentum, self.bn_epsilon,
                                               self.synchronized_bn, name="stem_bn")
        self.stem_pool = keras.layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")
        repeats = [round_repeats(r, self.depth_coefficient) for r in STAGE_DEPTHS[model_name]]
        total_blocks = sum(repeats)
        self.blocks = []
        channels = width(STEM_WIDTH)
        for stage, (count, stage_width) in enumerate(zip(repeats, STAGE_WIDTHS)):
            for i in range(count):
                index = len(self.blocks)
                block = BottleneckBlock(
                    channels, width(stage_width), 2 if (i == 0 and stage > 0) else 1, self.domains,
                    drop_rate=self.drop_connect_rate * index / total_blocks, bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon, synchronized_bn=self.synchronized_bn,
                    name=f"stage{stage + 1}_block{i}",
                )
                self.blocks.append(block)
                channels = 4 * width(stage_width)
        self.head_dropout = SeededDropout(self.dropout_rate, name="head_dropout") if self.dropout_rate > 0 else None
        self.classifier = keras.layers.Dense(
            self.num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            bias_initializer="zeros", name="classifier",
        )

    def weighted_layers(self):
        layers = [self.stem_conv, self.stem_bn]
        for block in self.blocks:
            layers.extend(block.weighted_layers())
        return layers + [self.classifier]

    def weight_decay_variables(self):
        """Conv and dense kernels only (the authors regularize '.*/W': no bias, no BN)."""
        return [layer.kernel for layer in self.weighted_layers()
                if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]

    def features(self, pixels, training=None, domain=None, bn_mode=None):
        bn_kwargs = dict(training=training, domain=domain, bn_mode=bn_mode)
        x = self.normalized_input(pixels)
        x = self.stem_pool(tf.nn.relu(self.stem_bn(self.stem_conv(x), **bn_kwargs)))
        for block in self.blocks:
            x = block(x, **bn_kwargs)
        return tf.reduce_mean(x, axis=[1, 2])
