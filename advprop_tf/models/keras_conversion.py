"""Any Keras network as a multi-domain one: `to_multi_domain(model)` and `--model=keras:<constructor>`.

The converted network (KerasNetwork) is the same functional graph with every
`keras.layers.BatchNormalization` replaced by a MultiBatchNormalization whose
domains all start as copies of that BN (gamma, beta, moving statistics,
momentum, epsilon, center/scale, trainable (a frozen BN stays frozen), regularizers, constraints and dtype
policy kept); every other layer keeps its weights.
It has our call contract, `net(pixels, training=..., domain=..., bn_mode=...)`
on raw pixels in [0, 255]: it applies the pixel normalization the original
expects (its `preprocess_input`, or none where it is built in), so attacks keep
working in pixel units, and it returns logits (a final softmax of the original
is left out; `inference_model()` puts it back).

Routing: a functional graph cannot pass `domain=` to its inner layers, so the
network's call sets it for the duration of the call (multi_bn.routing), per
thread, and every converted BN reads it; one call routes the whole graph. It
is read when the graph is traced, so each (domain, bn_mode) is its own trace.

BNs inside a custom (subclassed) layer cannot be reached by the graph cloning:
a model with one is refused, as is a model without any BN or with a BN over
another axis than the channels.
"""

from __future__ import annotations

import importlib
import json

import keras
import numpy as np
import tensorflow as tf

from advprop_tf.domains import DEFAULT_DOMAINS, MAIN
from advprop_tf.models.base import INPUT_NORMALIZATIONS, normalize_pixels
from advprop_tf.models.dropout import SeededDropout
from advprop_tf.models.multi_bn import MultiBatchNormalization, routing

PREFIX = "keras:"


class ConversionError(ValueError):
    """A Keras model that cannot become a multi-domain network; the message says which layer and why."""


def _sublayers(layer):
    """The layers of a (nested) model in order; a plain layer's tracked sublayers."""
    return list(layer.layers) if isinstance(layer, keras.Model) else list(layer._flatten_layers(include_self=False))


def walk(model):
    """Every layer of a model, nested models' layers included, depth first in the model's order."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from walk(layer)


def _check(model):
    if not isinstance(model, keras.Model) or not hasattr(model, "inputs") or model.inputs is None:
        raise ConversionError(f"{model!r} is not a functional or Sequential Keras model (a subclassed model's "
                              "graph cannot be rewritten)")
    norms = []
    for layer in walk(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            rank = len(layer.input.shape) if hasattr(layer, "input") else 4
            if layer.axis not in (-1, rank - 1):
                raise ConversionError(f"{model.name}: BatchNormalization {layer.name!r} normalizes axis {layer.axis}, "
                                      "not the channels (channels-last, the last axis): not supported")
            norms.append(layer)
        elif not isinstance(layer, keras.Model):
            hidden = [s.name for s in _sublayers(layer) if isinstance(s, keras.layers.BatchNormalization)]
            if hidden:
                raise ConversionError(f"{model.name}: layer {layer.name!r} ({type(layer).__name__}) holds "
                                      f"BatchNormalization {hidden[0]!r} inside it, which cannot be converted")
    if not norms:
        raise ConversionError(f"{model.name} has no BatchNormalization layer: there is no BN to give each domain "
                              "its own (AdvProp needs BNs)")


def _is_output_softmax(layer, model):
    activation = getattr(layer, "activation", None)
    return activation is keras.activations.softmax and layer.name == _last_layer(model).name


def _last_layer(model):
    last = model.layers[-1]
    return _last_layer(last) if isinstance(last, keras.Model) else last


def convert_graph(model, domains):
    """A copy of `model`'s graph (fresh weights) with multi-domain BNs and logits out."""

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            return MultiBatchNormalization(domains, momentum=layer.momentum, epsilon=layer.epsilon,
                                           synchronized=config.get("synchronized", False), center=layer.center,
                                           scale=layer.scale, gamma_regularizer=layer.gamma_regularizer,
                                           beta_regularizer=layer.beta_regularizer,
                                           gamma_constraint=layer.gamma_constraint,
                                           beta_constraint=layer.beta_constraint, trainable=layer.trainable,
                                           dtype=layer.dtype_policy, name=layer.name)
        if type(layer) is keras.layers.Dropout:  # its generator variable is not XLA-legal on several replicas
            return SeededDropout(layer.rate, noise_shape=layer.noise_shape, name=layer.name)
        if _is_output_softmax(layer, model):
            config["activation"] = "linear"
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone, recursive=True)


def copy_between(source, target, domain_of=lambda domain: MAIN):
    """Assign `target`'s weights from `source`, layer by layer in graph order (the same architecture, BNs
    plain or multi-domain on either side). `domain_of(target domain)` picks the source's domain of a
    multi-domain source BN; a plain BN fills every domain of a multi-domain target."""
    pairs = list(zip(_weighted(source), _weighted(target)))
    if len(_weighted(source)) != len(_weighted(target)):
        raise ConversionError(f"{source.name} and {target.name} are not the same architecture")
    for src, dst in pairs:
        if src.name != dst.name:
            raise ConversionError(f"layer {dst.name!r} pairs with {src.name!r}: not the same architecture")
        if isinstance(dst, MultiBatchNormalization):
            for domain in dst.domains:
                values = _bn_values(src, domain_of(domain))
                for key, variable in dst.domain_variables(domain).items():
                    variable.assign(values[key])
        elif isinstance(src, MultiBatchNormalization):  # back to a plain BN
            values = _bn_values(src, domain_of(MAIN))
            for key in ("gamma", "beta", "moving_mean", "moving_variance"):
                if getattr(dst, key, None) is not None:
                    getattr(dst, key).assign(values[key])
        else:
            for s, t in zip(src.weights, dst.weights):
                t.assign(s)


def _weighted(model):
    return [layer for layer in walk(model) if not isinstance(layer, keras.Model) and layer.weights]


def _bn_values(layer, domain):
    if isinstance(layer, MultiBatchNormalization):
        return {k: tf.convert_to_tensor(v) for k, v in layer.domain_variables(domain).items()}
    return {k: tf.convert_to_tensor(getattr(layer, k)) for k in ("gamma", "beta", "moving_mean", "moving_variance")
            if getattr(layer, k, None) is not None}


@keras.saving.register_keras_serializable(package="advprop_tf")
class KerasNetwork(keras.Model):
    """A converted Keras network with our call contract (see the module docstring)."""

    def __init__(self, architecture: dict, domains=DEFAULT_DOMAINS, input_normalization: str = "none",
                 model_name: str = "keras", num_classes: int | None = None, resolution: int | None = None,
                 **kwargs):
        if input_normalization not in INPUT_NORMALIZATIONS:
            raise ValueError(f"input_normalization must be one of {INPUT_NORMALIZATIONS}, got {input_normalization!r}")
        super().__init__(name=kwargs.pop("name", "keras_network"), **kwargs)
        self._architecture = json.dumps(architecture)  # a string: Keras would wrap a dict attribute
        original = keras.saving.deserialize_keras_object(architecture)
        _check(original)
        self.domains = tuple(domains)
        self.input_normalization = input_normalization
        self.model_name = model_name
        self.output_softmax = _is_output_softmax(_last_layer(original), original)
        self.inner = convert_graph(original, self.domains)
        shape = self.inner.inputs[0].shape
        self.resolution = int(resolution or shape[1] or 224)
        self.num_classes = int(num_classes or self.inner.outputs[0].shape[-1])
        dense = [layer for layer in _weighted(self.inner) if isinstance(layer, keras.layers.Dense)]
        self.classifier = dense[-1] if dense else None

    @property
    def architecture(self) -> dict:
        """The original network's Keras serialization (its graph, not its weights)."""
        return json.loads(self._architecture)

    @property
    def main_domain(self) -> str:
        return self.domains[0]

    def call(self, inputs, training=None, domain=None, bn_mode=None):
        x = tf.cast(normalize_pixels(inputs, self.input_normalization), self.compute_dtype)
        with routing(domain, bn_mode):
            return tf.cast(self.inner(x, training=training), tf.float32)

    def weighted_layers(self):
        return _weighted(self.inner)

    def bn_layers(self):
        return [layer for layer in self.weighted_layers() if isinstance(layer, MultiBatchNormalization)]

    def weight_decay_variables(self):
        """Every trainable weight but the BNs' (as our EfficientNet)."""
        bn_ids = {id(v) for layer in self.bn_layers() for v in layer.weights}
        return [v for v in self.trainable_variables if id(v) not in bn_ids]

    def build_weights(self):
        if not self.built or not self.weights:
            self(tf.zeros([1, self.resolution, self.resolution, 3]), training=False)
        return self

    def inference_model(self, domain: str | None = None) -> keras.Model:
        """The ORIGINAL architecture (plain BatchNormalization, its own softmax) with `domain`'s BN (the main one
        by default; an adversarial one gives the robust network): plain Keras, loadable without advprop_tf. It
        expects what the original expects (its preprocess_input), not raw pixels."""
        domain = domain or self.main_domain
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; the network has {', '.join(self.domains)}")
        plain = keras.saving.deserialize_keras_object(self.architecture)
        copy_between(self.inner, plain, domain_of=lambda _: domain)
        return plain

    def get_config(self):
        return {"architecture": self.architecture, "domains": list(self.domains),
                "input_normalization": self.input_normalization, "model_name": self.model_name,
                "num_classes": self.num_classes, "resolution": self.resolution, "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config).build_weights()


def to_multi_domain(model: keras.Model, domains=DEFAULT_DOMAINS, input_normalization: str = "none",
                    model_name: str | None = None) -> KerasNetwork:
    """`model` (functional or Sequential, with its weights) as a multi-domain network: see the module docstring.
    `input_normalization`: what the original expects of [0, 255] pixels (imagenet = Keras' "torch" mode,
    inception = "tf", caffe, none); `preprocessing_of(constructor)` tells it for keras.applications."""
    _check(model)
    network = KerasNetwork(keras.saving.serialize_keras_object(model), domains, input_normalization,
                           model_name or f"{PREFIX}{model.name}").build_weights()
    copy_between(model, network.inner)
    return network


# ------------------------------------------------------------ keras.applications
def application_names() -> tuple:
    """keras.applications' constructors (the names --model=keras:<name> takes)."""
    return tuple(sorted(name for name in dir(keras.applications)
                        if name[:1].isupper() and callable(getattr(keras.applications, name))))


def preprocessing_of(constructor) -> str:
    """The input normalization a keras.applications constructor's network expects, read off its own
    preprocess_input (applied to a probe pixel)."""
    module = importlib.import_module(constructor.__module__)
    probe = np.array([[[[0.0, 100.0, 255.0]]]], np.float32)
    expected = np.asarray(module.preprocess_input(probe.copy()))
    for mode in ("none", "inception", "imagenet", "caffe"):
        if np.allclose(expected, normalize_pixels(probe, mode).numpy(), atol=1e-3):
            return mode
    raise ConversionError(f"{constructor.__name__}'s preprocess_input is none of {INPUT_NORMALIZATIONS}")


def build_application(name: str, num_classes: int = 1000, domains=DEFAULT_DOMAINS, resolution: int | None = None,
                      dropout_rate: float | None = None, weights: str | None = None,
                      input_normalization: str | None = None) -> KerasNetwork:
    """keras:<name>: the constructor's network without its top (weights None, "imagenet" or a file of that
    network), average-pooled, dropout, a new dense head of `num_classes` logits; converted."""
    if name not in application_names():
        raise ConversionError(f"keras.applications has no {name!r}; valid: {', '.join(application_names())}")
    constructor = getattr(keras.applications, name)
    size = int(resolution or 224)
    try:
        base = constructor(include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg")
    except Exception as e:  # a failed download, a file of another network, an impossible size
        message = str(e)
        raise ConversionError(f"keras.applications.{name}(weights={weights!r}, input_shape=({size}, {size}, 3)): "
                              f"{message.splitlines()[0] if message else type(e).__name__}") from None
    x = base.output
    if dropout_rate:
        x = keras.layers.Dropout(dropout_rate, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, name="classifier")(x)
    model = keras.Model(base.inputs, outputs, name=name.lower())
    return to_multi_domain(model, domains, input_normalization or preprocessing_of(constructor),
                           model_name=f"{PREFIX}{name}")

