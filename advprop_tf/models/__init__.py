"""Networks of the registry (EfficientNet B0-B8/L2, ResNet-50 ... 638), every BN multi-domain."""

from advprop_tf.models.base import INPUT_NORMALIZATIONS, MultiDomainNetwork, round_filters, round_repeats
from advprop_tf.models.efficientnet import EFFICIENTNET_NAMES, SCALING, EfficientNet, build_efficientnet
from advprop_tf.models.multi_bn import BN_MODES, Chunks, MultiBatchNormalization
from advprop_tf.models.registry import MODEL_NAMES, build_model, model_class, model_from_config
from advprop_tf.models.resnet import RESNET_NAMES, STAGE_DEPTHS, ResNet

__all__ = [
    "BN_MODES",
    "Chunks",
    "EFFICIENTNET_NAMES",
    "INPUT_NORMALIZATIONS",
    "MODEL_NAMES",
    "RESNET_NAMES",
    "SCALING",
    "STAGE_DEPTHS",
    "EfficientNet",
    "MultiBatchNormalization",
    "MultiDomainNetwork",
    "ResNet",
    "build_efficientnet",
    "build_model",
    "model_class",
    "model_from_config",
    "round_filters",
    "round_repeats",
]
