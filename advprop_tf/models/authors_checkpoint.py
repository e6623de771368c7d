"""Read the authors' TF1 EfficientNet / AdvProp checkpoints (tensorflow/tpu naming) into our model.

Their variables live under `efficientnet-bN/`: `stem/conv2d/kernel`,
`stem/tpu_batch_normalization/{gamma,beta,moving_mean,moving_variance}`,
`blocks_K/...` and `head/{conv2d,tpu_batch_normalization,dense}/...`. Inside a
block the layer names are numbered in creation order, so they depend on
whether the block has an expansion conv (see `block_layer_names`). Every
variable has an EMA shadow `<name>/ExponentialMovingAverage`, which is what
the authors evaluate; optimizer slots (RMSProp...) are ignored.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from advprop_tf.models.efficientnet import EfficientNet, MBConvBlock
from advprop_tf.models.multi_bn import MultiBatchNormalization

EMA_SUFFIX = "ExponentialMovingAverage"
SLOT_SUFFIXES = ("RMSProp", "RMSProp_1", "Momentum", "Adam", "Adam_1")
BN_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model; the message names the variable."""


def block_layer_names(block: MBConvBlock) -> dict:
    """Our layer attribute -> the authors' layer name inside `blocks_K/`."""
    if block.expand_ratio != 1:
        names = {"expand_conv": "conv2d", "expand_bn": "tpu_batch_normalization",
                 "depthwise_conv": "depthwise_conv2d", "depthwise_bn": "tpu_batch_normalization_1",
                 "project_conv": "conv2d_1", "project_bn": "tpu_batch_normalization_2"}
    else:
        names = {"depthwise_conv": "depthwise_conv2d", "depthwise_bn": "tpu_batch_normalization",
                 "project_conv": "conv2d", "project_bn": "tpu_batch_normalization_1"}
    if block.se_reduce is not None:
        names.update(se_reduce="se/conv2d", se_expand="se/conv2d_1")
    return names


def _layer_variables(layer, domain):
    """(authors' variable leaf name, our variable) pairs of one layer."""
    if isinstance(layer, MultiBatchNormalization):
        variables = layer.domain_variables(domain)
        return [(key, variables[key]) for key in BN_KEYS]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [("depthwise_kernel", layer.kernel)]
    pairs = [("kernel", layer.kernel)]
    if getattr(layer, "bias", None) is not None:
        pairs.append(("bias", layer.bias))
    return pairs


def variable_names(model: EfficientNet, scope: str, domain: str | None = None) -> list:
    """Every (authors' name, our variable) of `model`, BNs of `domain` (default: the main one)."""
    domain = domain or model.main_domain
    layers = [("stem/conv2d", model.stem_conv), ("stem/tpu_batch_normalization", model.stem_bn)]
    for index, block in enumerate(model.blocks):
        for attribute, name in block_layer_names(block).items():
            layers.append((f"blocks_{index}/{name}", getattr(block, attribute)))
    layers += [("head/conv2d", model.head_conv), ("head/tpu_batch_normalization", model.head_bn),
               ("head/dense", model.classifier)]
    return [(f"{scope}/{prefix}/{leaf}", variable)
            for prefix, layer in layers for leaf, variable in _layer_variables(layer, domain)]


def checkpoint_scopes(names) -> list:
    """The model scopes (e.g. efficientnet-b0) a checkpoint holds, found by their stem kernel."""
    suffix = "/stem/conv2d/kernel"
    return sorted(n[: -len(suffix)] for n in names if n.endswith(suffix))


def is_slot(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in SLOT_SUFFIXES


@dataclasses.dataclass
class LoadReport:
    loaded: int
    from_ema: int
    without_ema: list  # names read raw although EMA was asked for (no shadow)
    unused: list  # checkpoint variables that are neither used, shadows of used ones, nor slots


def load_authors_checkpoint(model: EfficientNet, prefix: str, scope: str | None = None,
                            use_ema: bool = True, domains=None) -> LoadReport:
    """Assign every weight of `model` from the TF1 checkpoint at `prefix`.

    BN values go to each of `domains` (default: all of the model's, so
    auxiliary BNs start as copies of the main one). Raises CheckpointMismatch
    naming the first missing or mis-shaped variable; nothing is assigned then.
    """
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)  # works on ram:// and gs:// prefixes
    shapes = reader.get_variable_to_shape_map()
    scopes = checkpoint_scopes(shapes)
    scope = scope or model.model_name
    if scope not in scopes:
        held = ", ".join(scopes) or "no EfficientNet"
        raise CheckpointMismatch(f"the checkpoint holds {held}, not {scope}")
    domains = tuple(domains or model.domains)
    plan = []  # (our variable, value)
    used, from_ema, without_ema = set(), 0, []
    for name, variable in variable_names(model, scope):
        if name not in shapes:
            raise CheckpointMismatch(f"variable {name} is missing from the checkpoint")
        if tuple(shapes[name]) != tuple(variable.shape):
            raise CheckpointMismatch(
                f"variable {name} has shape {tuple(shapes[name])} in the checkpoint, "
                f"{tuple(variable.shape)} in {model.model_name}")
        shadow = f"{name}/{EMA_SUFFIX}"
        used.update({name, shadow})
        if use_ema and shadow in shapes:
            value, from_ema = reader.get_tensor(shadow), from_ema + 1
        else:
            value = reader.get_tensor(name)
            if use_ema:
                without_ema.append(name)
        plan.append((variable, value))
    # A BN variable of the main domain stands for the same one in every domain.
    bn_targets = _bn_domain_targets(model, domains)
    for variable, value in plan:
        for target in bn_targets.get(id(variable), [variable]):
            target.assign(np.asarray(value, dtype=np.float32))
    unused = sorted(n for n in shapes if n not in used and not is_slot(n))
    return LoadReport(len(plan), from_ema, without_ema, unused)


def _bn_domain_targets(model, domains):
    targets = {}
    for layer in model.weighted_layers():
        if isinstance(layer, MultiBatchNormalization):
            main = layer.domain_variables(model.main_domain)
            for key in BN_KEYS:
                targets[id(main[key])] = [layer.domain_variables(d)[key] for d in domains]
    return targets
