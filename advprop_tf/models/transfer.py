"""Copy weights between two networks of the same architecture, BN domain by BN domain.

Used by export (a one-domain inference copy of one training domain) and by
--init_checkpoint (fine-tuning: a new head, auxiliary BNs started from the
main BN).
"""

from __future__ import annotations

from typing import Callable

from advprop_tf.models.base import MultiDomainNetwork
from advprop_tf.models.multi_bn import MultiBatchNormalization


def default_domain_of(source: MultiDomainNetwork) -> Callable[[str], str]:
    """A target domain reads the source domain of the same name, else the source's main BN."""
    return lambda domain: domain if domain in source.domains else source.main_domain


def copy_weights(source: MultiDomainNetwork, target: MultiDomainNetwork, domain_of: Callable[[str], str] | None = None,
                 skip_head: bool = False) -> None:
    """Assign `target`'s weights from `source`; raises ValueError naming the first mismatch.

    `domain_of(target_domain) -> source_domain` picks which BN of the source
    fills each BN domain of the target. With `skip_head` the classifier keeps
    its own (fresh) weights, e.g. for a different number of classes.
    """
    domain_of = domain_of or default_domain_of(source)
    pairs = list(zip(source.weighted_layers(), target.weighted_layers()))
    if len(source.weighted_layers()) != len(target.weighted_layers()):
        raise ValueError(f"{source.model_name} ({len(source.weighted_layers())} weighted layers) and "
                         f"{target.model_name} ({len(target.weighted_layers())}) are not the same architecture")
    for src, dst in pairs:
        if skip_head and dst is target.classifier:
            continue
        if isinstance(dst, MultiBatchNormalization):
            for domain in target.domains:
                values = src.domain_variables(domain_of(domain))
                for key, variable in dst.domain_variables(domain).items():
                    _assign(variable, values[key], dst)
            continue
        for s, t in zip(src.weights, dst.weights):
            if tuple(s.shape) != tuple(t.shape):
                hint = " (a different number of classes? pass --init_skip_head)" if dst is target.classifier else ""
                raise ValueError(f"layer {dst.path}: shape {tuple(t.shape)} here, {tuple(s.shape)} in the "
                                 f"source{hint}")
            t.assign(s)


def _assign(variable, value, layer):
    if tuple(variable.shape) != tuple(value.shape):
        raise ValueError(f"layer {layer.path}: shape {tuple(variable.shape)} here, {tuple(value.shape)} in the source")
    variable.assign(value)
