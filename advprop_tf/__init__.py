"""AdvProp (Xie et al., CVPR 2020) for TensorFlow 2 / Keras 3.

    advprop_tf.to_multi_domain(keras_model)   any Keras network with a BN per domain (models/keras_conversion.py)
    advprop_tf.AdvPropModel(network, method)  AdvProp through compile() / fit() (training/keras_model.py)
    advprop_tf.export_network(network, dir)   the main-BN SavedModel of a network in memory (serving.py)

Imported on first use, so that `import advprop_tf` alone does not start TensorFlow.
"""

__version__ = "0.1.0"

_LAZY = {
    "to_multi_domain": "advprop_tf.models.keras_conversion",
    "AdvPropModel": "advprop_tf.training.keras_model",
    "export_network": "advprop_tf.serving",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'advprop_tf' has no attribute {name!r}")
