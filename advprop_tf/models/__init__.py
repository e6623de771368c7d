"""Networks: EfficientNet B0-B8/L2 with multi-domain batch normalization."""

from advprop_tf.models.efficientnet import (
    MODEL_NAMES,
    SCALING,
    EfficientNet,
    build_efficientnet,
    round_filters,
    round_repeats,
)
from advprop_tf.models.multi_bn import BN_MODES, MultiBatchNormalization

__all__ = [
    "BN_MODES",
    "MODEL_NAMES",
    "SCALING",
    "EfficientNet",
    "MultiBatchNormalization",
    "build_efficientnet",
    "round_filters",
    "round_repeats",
]
