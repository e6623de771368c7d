"""Stateless random numbers that are the same with and without XLA, on every device.

TensorFlow's stateless FLOAT ops turn random bits into floats one way in its
own kernels and another way under XLA (`jit_compile`, every TPU): the same
seed gives other numbers, so a compiled step could not be checked against an
uncompiled one. Philox's integer bits agree everywhere; floats here are made
from them by one fixed rule (the top 24 bits, exactly representable).

The training step's dropout draws its masks through `seeded(seed)`: every
dropout call inside gets a seed of its own, folded from the step's seed and
the call's order, so masks differ per step, replica and layer, and the step
needs no random-generator variable (a variable update inside the replicated,
compiled step would not be XLA-legal on several replicas).
"""

from __future__ import annotations

import contextlib
import threading

import tensorflow as tf

_ALGORITHM = "philox"
_local = threading.local()  # MirroredStrategy runs each replica's step in its own thread


def _pair(seed):
    seed = tf.cast(tf.reshape(seed, [-1]), tf.int32)
    return seed if seed.shape[0] == 2 else tf.stack([seed[0], tf.constant(0, tf.int32)])


def fold_in(seed, salt: int):
    """A new seed pair from `seed` and an integer salt (distinct salts give independent streams)."""
    seed = _pair(seed)
    return tf.stack([seed[0], seed[1] * 7919 + tf.constant(salt % (2**31 - 1), tf.int32)])


REPLICA_STRIDE = 1_000_003  # odd: multiplying by it is a bijection of int32, so each replica gets its own word


def replica_seed(seed, counter, replica):
    """The seed pair of one replica at one step (or batch): (seed + REPLICA_STRIDE x replica, counter).

    Distinct for every (replica, counter) of a run, by construction: the first word is a bijection of the
    replica id (int32 arithmetic wraps), the second is the counter. Replica 0 keeps (seed, counter), so one
    device draws what it always drew. (Packing both into one word, counter x 1024 + replica, repeated
    draws beyond 1024 replicas.)"""
    first = tf.constant(seed, tf.int32) + tf.constant(REPLICA_STRIDE, tf.int32) * tf.cast(replica, tf.int32)
    return tf.stack([first, tf.cast(counter, tf.int32)], axis=-1)


def random_bits(shape, seed):
    """int32 random bits, identical with and without XLA."""
    return tf.random.stateless_uniform(shape, _pair(seed), minval=None, maxval=None, dtype=tf.int32,
                                       alg=_ALGORITHM)


def uniform(shape, seed, minval=0.0, maxval=1.0):
    """float32 uniform in [minval, maxval), identical with and without XLA."""
    top = tf.bitwise.bitwise_and(tf.bitwise.right_shift(random_bits(shape, seed), 8), 0xFFFFFF)
    unit = tf.cast(top, tf.float32) * (1.0 / 16777216.0)
    return minval + (maxval - minval) * unit


def integers(shape, seed, minval: int, maxval: int):
    """int32 uniform in [minval, maxval), identical with and without XLA."""
    return tf.random.stateless_uniform(shape, _pair(seed), minval=minval, maxval=maxval, dtype=tf.int32,
                                       alg=_ALGORITHM)


@contextlib.contextmanager
def seeded(seed):
    """Within, `next_seed()` hands out one new seed per call, derived from `seed` (an int pair tensor)."""
    previous = getattr(_local, "state", None)
    _local.state = [seed, 0]
    try:
        yield
    finally:
        _local.state = previous


def next_seed():
    """The next seed of the innermost `seeded` block, or None outside one."""
    state = getattr(_local, "state", None)
    if state is None:
        return None
    state[1] += 1
    return fold_in(state[0], 0xD20F + state[1])
