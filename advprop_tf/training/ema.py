"""Exponential moving average of ALL model weights, BN moving statistics included.

The authors average every variable (tf.train.ExponentialMovingAverage with
num_updates = global step, so the decay is min(decay, (1 + t) / (10 + t))) and
evaluate and export with the averages. Keras' optimizer EMA covers only
trainable variables, hence this small class.

The update runs inside the replicated step (replica context), so that under
TPUStrategy it runs on the device with the rest of the step instead of on
the host. Every replica holds the same weights after the update, so each
moves its own copy of the shadows identically: the shadows are sync-on-read
variables (read from the first replica), and updating them needs no
communication between replicas.
"""

from __future__ import annotations

import tensorflow as tf


def averaged_weights(model):
    """The weights an EMA averages: every floating-point one, in `model.weights` order."""
    return [v for v in model.weights if tf.as_dtype(v.dtype).is_floating]


class ExponentialMovingAverage(tf.Module):
    def __init__(self, model, decay: float = 0.9999):
        super().__init__(name="ema")
        self.decay = float(decay)
        # Floating-point weights only: an integer one (Keras' Normalization layer counts its samples in an int64,
        # and Keras' EfficientNets hold one) is not an average of anything.
        self._model_variables = averaged_weights(model)
        self.shadows = [
            tf.Variable(tf.convert_to_tensor(v), trainable=False, name=v.path.replace("/", "__"),
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for v in self._model_variables
        ]

    def reset(self):
        """Shadows := the current weights (after initializing the model from a checkpoint)."""
        for shadow, variable in zip(self.shadows, self._model_variables):
            shadow.assign(tf.cast(tf.convert_to_tensor(variable), shadow.dtype))

    def effective_decay(self, step):
        step = tf.cast(step, tf.float32)
        return tf.minimum(self.decay, (1.0 + step) / (10.0 + step))

    def update(self, step, hold=None):
        """Move every shadow toward its variable (in the replicated step: replica context).

        `hold` (bool tensor): keep the shadows as they are this time (a skipped step).
        """
        decay = self.effective_decay(step)
        if hold is not None:
            decay = tf.where(hold, 1.0, decay)
        for shadow, variable in zip(self.shadows, self._model_variables):
            value = tf.cast(tf.convert_to_tensor(variable), shadow.dtype)
            shadow.assign(shadow * decay + value * (1.0 - decay))

    def copy_to(self, model):
        """Write the averages into `model` (same architecture as the tracked one)."""
        for shadow, variable in zip(self.shadows, averaged_weights(model)):
            variable.assign(tf.cast(shadow, variable.dtype))

    def swap(self):
        """Exchange model values and averages (call twice to undo)."""
        for shadow, variable in zip(self.shadows, self._model_variables):
            current = tf.convert_to_tensor(variable)
            variable.assign(tf.cast(shadow, variable.dtype))
            shadow.assign(tf.cast(current, shadow.dtype))
