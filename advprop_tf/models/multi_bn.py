"""Batch normalization with one full set of BN variables per data domain.

AdvProp normalizes clean and adversarial images with separate statistics
("disentangled" BN) while every other weight is shared. This layer keeps, per
domain, gamma, beta, moving mean and moving variance; the first domain is the
main one, the one kept for inference.

Routing (`domain=` in `call`):
  * a name: the whole batch uses that domain's BN;
  * a tuple of names: the batch is split into equal consecutive chunks, chunk i
    normalized by domain i. This is computed as ONE reshape to
    [num_chunks, chunk, ..., C] and a reduction per chunk, so a concatenated
    clean+adversarial batch costs about the same as a plain BN;
  * `Chunks(domains, sizes, bn_modes)`: consecutive chunks of the given sizes,
    each with its own domain and optionally its own BN mode (e.g. 26 clean
    images in "train" mode and 6 others in "batch" mode through every conv
    once). An even split in batch-statistics mode runs this way too: one
    fused BN op per chunk beats the reshaped plain ops (AdvProp PGD-1 step
    0.329 vs 0.385 s here).

BN mode (`bn_mode=`):
  * "train": batch statistics, moving statistics updated (default when training);
  * "batch": batch statistics, moving statistics NOT updated (for attacks that
    must see training-mode BN without side effects);
  * "inference": moving statistics (default when not training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Sequence

import keras
import tensorflow as tf

from advprop_tf.domains import DEFAULT_DOMAINS

BN_MODES = ("train", "batch", "inference")
_local = threading.local()  # MirroredStrategy runs each replica's step in its own thread


class StatisticUpdates:
    """The moving-statistic updates of a forward pass, collected instead of assigned.

    Inside `collecting_statistic_updates()` a training-mode BN records its new
    moving mean and variance here; later reads in the same pass see them. The
    train step returns them from its (XLA-compiled, side-effect-free) part and
    assigns them outside it, where several replicas may average them: an
    assignment that synchronises replicas is not legal inside XLA.
    """

    def __init__(self):
        self._values = {}  # id(variable) -> (variable, new value)

    def read(self, variable):
        entry = self._values.get(id(variable))
        return tf.convert_to_tensor(variable) if entry is None else entry[1]

    def write(self, variable, value):
        self._values[id(variable)] = (variable, value)

    def items(self):
        """(variable, new value) pairs, in the order of their first update."""
        return list(self._values.values())


@contextlib.contextmanager
def collecting_statistic_updates():
    """Within, every MultiBatchNormalization records its updates in the yielded StatisticUpdates."""
    previous = getattr(_local, "updates", None)
    _local.updates = StatisticUpdates()
    try:
        yield _local.updates
    finally:
        _local.updates = previous


def _collector():
    return getattr(_local, "updates", None)


@contextlib.contextmanager
def routing(domain=None, bn_mode=None):
    """Within, a MultiBatchNormalization called without `domain` and `bn_mode` (by a Keras functional graph,
    which cannot pass them on: models/keras_conversion.py) takes these."""
    previous = getattr(_local, "route", None)
    _local.route = (domain, bn_mode)
    try:
        yield
    finally:
        _local.route = previous


def resolve_bn_mode(training, bn_mode):
    """Return the effective BN mode for a call."""
    if bn_mode is None:
        return "train" if training else "inference"
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    return bn_mode


@dataclasses.dataclass(frozen=True)
class Chunks:
    """Uneven routing of a batch: `sizes[i]` consecutive images through `domains[i]`'s BN,
    in `bn_modes[i]` (None: the call's mode)."""

    domains: tuple
    sizes: tuple
    bn_modes: tuple = None

    def __post_init__(self):
        modes = self.bn_modes or (None,) * len(self.domains)
        if not self.domains or len(self.sizes) != len(self.domains) or len(modes) != len(self.domains):
            raise ValueError(f"Chunks needs one size and BN mode per domain, got {self}")
        if any(int(n) < 1 for n in self.sizes):
            raise ValueError(f"Chunks sizes must be positive, got {self.sizes}")
        for mode in modes:
            if mode is not None and mode not in BN_MODES:
                raise ValueError(f"bn_mode must be one of {BN_MODES}, got {mode!r}")
        object.__setattr__(self, "bn_modes", tuple(modes))


@keras.saving.register_keras_serializable(package="advprop_tf")
class MultiBatchNormalization(keras.layers.Layer):
    """Channels-last batch normalization with one BN per domain."""

    # Batch statistics through TensorFlow's fused op (one op instead of ~40). Set False (on the class, for
    # every layer) to compute them with plain ops: the same function, other float round-off, for checking
    # that a result does not depend on it.
    fused = True

    def __init__(
        self,
        domains: Sequence[str] = DEFAULT_DOMAINS,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        synchronized: bool = False,
        gamma_initializer: str = "ones",
        center: bool = True,
        scale: bool = True,
        gamma_regularizer=None,
        beta_regularizer=None,
        gamma_constraint=None,
        beta_constraint=None,
        **kwargs,
    ):
        """`trainable=False` (a frozen BN, as fine-tuning recipes keep one) always normalizes with its moving
        statistics and never updates them, as Keras' BatchNormalization does; the regularizers and
        constraints apply to every domain's gamma and beta."""
        super().__init__(**kwargs)
        domains = tuple(domains)
        if not domains:
            raise ValueError("MultiBatchNormalization needs at least one domain")
        if len(set(domains)) != len(domains):
            raise ValueError(f"domain names must be unique, got {domains}")
        for d in domains:
            if not isinstance(d, str) or not d or "/" in d:
                raise ValueError(f"domain names must be non-empty strings without '/', got {d!r}")
        self.domains = domains
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.synchronized = bool(synchronized)
        # "zeros" for a residual block's last BN (the block starts as the identity).
        self.gamma_initializer = gamma_initializer
        # Keras' BatchNormalization(center=False / scale=False): no beta / gamma (0 / 1), as in the layer converted.
        self.center, self.scale = bool(center), bool(scale)
        self.supports_masking = False
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self._vars = {}

    @property
    def main_domain(self) -> str:
        return self.domains[0]

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("MultiBatchNormalization needs a known channel dimension")
        self._channels = int(channels)
        for d in self.domains:
            variables = {}
            if self.scale:
                variables["gamma"] = self.add_weight(
                    shape=(channels,), initializer=self.gamma_initializer, autocast=False, name=f"{d}_gamma",
                    regularizer=self.gamma_regularizer, constraint=self.gamma_constraint)
            if self.center:
                variables["beta"] = self.add_weight(shape=(channels,), initializer="zeros", autocast=False,
                                                    name=f"{d}_beta", regularizer=self.beta_regularizer,
                                                    constraint=self.beta_constraint)
            variables["moving_mean"] = self._add_statistic(channels, "zeros", f"{d}_moving_mean")
            variables["moving_variance"] = self._add_statistic(channels, "ones", f"{d}_moving_variance")
            self._vars[d] = variables

    def _add_statistic(self, channels, initializer, name):
        """A moving statistic: float32, never autocast; replicas' updates are averaged (MEAN), so every
        replica holds the same statistics and its inference-mode attack sees the same function.

        ON_READ synchronization (tf.keras 2's) had once measured ~40% slower here; measured again on two
        logical CPUs (AdvProp B0 64 px, batch 32 per replica), it costs +1.4% with the EMA after the step and
        +5% with it inside, not 40%. MEAN stays for the identical statistics.
        """
        return self.add_weight(
            shape=(channels,), initializer=initializer, trainable=False, autocast=False,
            aggregation="mean", name=name,
        )

    def domain_variables(self, domain: str) -> dict:
        """The four variables of one domain: gamma, beta, moving_mean, moving_variance."""
        self._check_domains((domain,))
        return self._vars[domain]

    # ------------------------------------------------------------------ call
    def _check_domains(self, names):
        for name in names:
            if name not in self.domains:
                raise ValueError(
                    f"unknown BN domain {name!r}; this layer has domains {self.domains}"
                )

    def _parse_domain(self, domain):
        if domain is None:
            return self.main_domain, None
        if isinstance(domain, str):
            self._check_domains((domain,))
            return domain, None
        names = tuple(domain)
        if not names:
            raise ValueError(f"empty domain tuple; this layer has domains {self.domains}")
        self._check_domains(names)
        if len(names) == 1:
            return names[0], None
        return None, names

    def _moments(self, x, axes):
        if self.synchronized:
            ctx = tf.distribute.get_replica_context()
            if ctx is not None and ctx.num_replicas_in_sync > 1:
                local_sum = tf.reduce_sum(x, axis=axes, keepdims=True)
                local_sq = tf.reduce_sum(tf.square(x), axis=axes, keepdims=True)
                count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
                total_sum, total_sq, total_count = ctx.all_reduce(
                    tf.distribute.ReduceOp.SUM, [local_sum, local_sq, count]
                )
                mean = total_sum / total_count
                variance = tf.maximum(total_sq / total_count - tf.square(mean), 0.0)
                return mean, variance
        return tf.nn.moments(x, axes, keepdims=True)

    def _affine(self, domain, key):
        """gamma or beta of a domain, or the constant 1 / 0 of a layer without it."""
        variable = self._vars[domain].get(key)
        if variable is not None:
            return variable
        return tf.ones([self._channels]) if key == "gamma" else tf.zeros([self._channels])

    def _statistic(self, domain, key):
        """A moving statistic as this pass sees it (with updates collected so far)."""
        variable = self._vars[domain][key]
        collector = _collector()
        return variable if collector is None else collector.read(variable)

    def _update(self, domain, mean, variance):
        m = self.momentum
        collector = _collector()
        for key, value in (("moving_mean", mean), ("moving_variance", variance)):
            variable = self._vars[domain][key]
            new = self._statistic(domain, key) * m + value * (1.0 - m)
            if collector is None:
                variable.assign(new)
            else:
                collector.write(variable, new)

    def call(self, inputs, training=None, domain=None, bn_mode=None, mask=None):
        if mask is not None:  # a converted Keras BN's graph may pass it; masked statistics are not supported
            raise ValueError(f"{self.name}: MultiBatchNormalization does not support masks")
        route = getattr(_local, "route", None)
        if route is not None and domain is None and bn_mode is None:
            domain, bn_mode = route
        mode = resolve_bn_mode(training, bn_mode) if self.trainable else "inference"  # frozen: as Keras' BN
        x = tf.cast(inputs, tf.float32)  # statistics always in float32
        if isinstance(domain, Chunks):
            return tf.cast(self._call_chunks(x, domain, mode), self.compute_dtype)
        single, names = self._parse_domain(domain)
        if single is not None:
            y = self._call_single(x, single, mode)
        else:
            y = self._call_split(x, names, mode)
        return tf.cast(y, self.compute_dtype)

    def _call_single(self, x, domain, mode):
        if mode != "inference" and len(x.shape) == 4 and not self._synchronized_here() and self.fused:
            return self._fused_batch_statistics(x, domain, mode)
        if mode == "inference":
            mean, variance = self._statistic(domain, "moving_mean"), self._statistic(domain, "moving_variance")
        else:
            axes = list(range(len(x.shape) - 1))
            mean, variance = self._moments(x, axes)
            mean = tf.reshape(mean, [-1])
            variance = tf.reshape(variance, [-1])
            if mode == "train":
                self._update(domain, mean, variance)
        return tf.nn.batch_normalization(
            x, mean, variance, self._affine(domain, "beta"), self._affine(domain, "gamma"), self.epsilon
        )

    def _synchronized_here(self):
        ctx = tf.distribute.get_replica_context()
        return self.synchronized and ctx is not None and ctx.num_replicas_in_sync > 1

    def _fused_batch_statistics(self, x, domain, mode):
        """Batch-statistics BN as ONE op forward and one backward (tf.nn.moments + batch_normalization
        are ~40 small ops a layer, and per-op cost dominates small passes). The same function: the
        fused op normalizes with the biased variance; the variance it returns is unbiased, which is
        undone before the moving variance is updated. It raises an epsilon below 1.001e-5 to that
        (ResNet's 1e-5: 1e-8 more in var + eps). Synchronized BN across replicas keeps the plain ops."""
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, self._affine(domain, "gamma"), self._affine(domain, "beta"), epsilon=self.epsilon, is_training=True,
            data_format="NHWC")
        if mode == "train":
            count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
            self._update(domain, mean, variance * tf.maximum(count - 1.0, 1.0) / count)
        return y

    def _call_chunks(self, x, chunks: Chunks, mode):
        self._check_domains(chunks.domains)
        batch = x.shape[0]
        if batch is not None and batch != sum(chunks.sizes):
            raise ValueError(f"batch of {batch} is not the {sum(chunks.sizes)} images of {chunks}")
        parts = tf.split(x, list(chunks.sizes), axis=0)
        return tf.concat([self._call_single(part, d, own or mode)
                          for part, d, own in zip(parts, chunks.domains, chunks.bn_modes)], axis=0)

    def _call_split(self, x, names, mode):
        n = len(names)
        batch = x.shape[0]
        if mode != "inference" and len(x.shape) == 4 and batch is not None and not batch % n \
                and not self._synchronized_here() and self.fused:
            return self._call_chunks(x, Chunks(names, (batch // n,) * n), mode)
        if batch is not None and batch % n:
            raise ValueError(
                f"batch of {batch} cannot be split evenly into the {n} domains {names}"
            )
        shape = tf.shape(x)
        if batch is None:
            check = tf.debugging.assert_equal(
                shape[0] % n,
                0,
                message=f"batch cannot be split evenly into the {n} domains {names}",
            )
            # The reshape below would fail too, with a cryptic message: run the check first.
            with tf.control_dependencies([check]):
                x = tf.identity(x)
        rank = len(x.shape)
        # [n, batch/n, ..., C]: chunk i belongs to domain i.
        xs = tf.reshape(x, tf.concat([[n, -1], shape[1:]], axis=0))
        param_shape = [n] + [1] * (rank - 1) + [-1]

        def stacked(key):
            values = [tf.convert_to_tensor(self._statistic(d, key) if key.startswith("moving") else self._affine(d, key))
                      for d in names]
            return tf.reshape(tf.stack(values), param_shape)

        if mode == "inference":
            mean, variance = stacked("moving_mean"), stacked("moving_variance")
        else:
            mean, variance = self._moments(xs, list(range(1, rank)))
            if mode == "train":
                flat_mean = tf.reshape(mean, [n, -1])
                flat_var = tf.reshape(variance, [n, -1])
                for i, d in enumerate(names):
                    self._update(d, flat_mean[i], flat_var[i])
        y = tf.nn.batch_normalization(
            xs, mean, variance, stacked("beta"), stacked("gamma"), self.epsilon
        )
        return tf.reshape(y, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            domains=list(self.domains),
            momentum=self.momentum,
            epsilon=self.epsilon,
            synchronized=self.synchronized,
            gamma_initializer=self.gamma_initializer,
            center=self.center,
            scale=self.scale,
            gamma_regularizer=keras.regularizers.serialize(self.gamma_regularizer),
            beta_regularizer=keras.regularizers.serialize(self.beta_regularizer),
            gamma_constraint=keras.constraints.serialize(self.gamma_constraint),
            beta_constraint=keras.constraints.serialize(self.beta_constraint),
        )
        return config
