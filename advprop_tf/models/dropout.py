"""Dropout whose masks come from the training step's seed instead of a random-generator variable.

Keras' Dropout keeps its generator's state in a variable that every call
updates. Inside the replicated, XLA-compiled step of several replicas such
an update is not legal, and TensorFlow's float random ops give other numbers
under XLA. `SeededDropout` draws from `randomness.next_seed()` (the step's
seed, this call's turn) with `randomness.uniform`: the same masks compiled
or not, different per step, replica and layer. Outside a seeded block (a
user calling the model with training=True) it falls back to TensorFlow's
global generator.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from advprop_tf import randomness


@keras.saving.register_keras_serializable(package="advprop_tf")
class SeededDropout(keras.layers.Layer):
    """Inverted dropout; `noise_shape` with 1s drops whole samples (drop connect: (None, 1, 1, 1))."""

    def __init__(self, rate: float, noise_shape=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.noise_shape = None if noise_shape is None else tuple(noise_shape)

    def call(self, inputs, training=None):
        if not training or self.rate == 0:
            return inputs
        shape = tf.shape(inputs)
        if self.noise_shape is not None:
            shape = tf.stack([shape[i] if n is None else n for i, n in enumerate(self.noise_shape)])
        seed = randomness.next_seed()
        draw = tf.random.uniform(shape) if seed is None else randomness.uniform(shape, seed)
        keep = tf.cast(draw >= self.rate, inputs.dtype)
        return inputs * keep / tf.cast(1.0 - self.rate, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return dict(super().get_config(), rate=self.rate,
                    noise_shape=None if self.noise_shape is None else list(self.noise_shape))
