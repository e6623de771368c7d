"""Small builders shared by the tests."""

import functools
import os

# on the PYTHONPATH of the processes the tests start: its sitecustomize turns Grappler off (conftest.py)
STARTED_PROCESSES_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "started_processes")


def as_users_run_it(**extra):
    """The environment of a command run as a user runs it: Grappler's rewrites on (without the sitecustomize that
    turns them off for the tests' other processes). For the end-to-end paths: the README's command, a CLI
    training, evaluation and export, XLA, two workers."""
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != STARTED_PROCESSES_SITE]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}


def tiny_model(num_classes=10, domains=("clean", "adv"), **kwargs):
    """A reduced B0 (few channels, one block per stage) for fast tests."""
    from advprop_tf.models import build_efficientnet

    kwargs.setdefault("width_coefficient", 0.25)
    kwargs.setdefault("depth_coefficient", 0.25)
    kwargs.setdefault("resolution", 32)
    return build_efficientnet(
        "efficientnet-b0", num_classes=num_classes, domains=domains, **kwargs
    )


def small_model(num_classes=10, dropout=0.0, name="small", synchronized_bn=False):
    """A functional Keras network with every kind of layer a conversion meets: convs, BNs (one without scale),
    a residual add, dropout, dense logits."""
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, 2, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(synchronized=synchronized_bn, name="bn0")(x))
    y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    y = keras.layers.BatchNormalization(scale=False, synchronized=synchronized_bn, name="bn1")(y)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name=name)


def synthetic_batches(batch_size=32, size=32, num_classes=10, split="train", num_examples=4096, seed=0):
    """Repeating float32 batches of the built-in synthetic set."""
    import tensorflow as tf

    from advprop_tf.data.synthetic import synthetic_dataset

    ds = synthetic_dataset(split, num_examples, size, num_classes, seed)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
    if split == "train":
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=split == "train")


def train_tiny(method_name="advprop", steps=100, batch_size=32, lr=0.016, attack=None, model=None, optimizer="rmsprop", **step_kwargs):
    """Train a tiny model with the real TrainStep on the synthetic set; returns (model, train_step)."""
    from advprop_tf.attacks.pgd import AttackConfig
    from advprop_tf.methods import get_method
    from advprop_tf.training.optimization import make_optimizer, make_schedule
    from advprop_tf.training.step import StepConfig, TrainStep

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(step_kwargs.pop("random_seed", 0))
    model = model or tiny_model()
    schedule = make_schedule("cosine", lr, steps_per_epoch=steps, total_steps=steps, warmup_epochs=0.05)
    optimizer = make_optimizer(optimizer, schedule, model)
    config = StepConfig(
        global_batch_size=batch_size, num_classes=model.num_classes, total_steps=steps,
        attack=attack or AttackConfig(epsilon=2, num_steps=1, step_size=2), **step_kwargs,
    )
    step = TrainStep(model, get_method(method_name), optimizer, config)
    iterator = iter(synthetic_batches(batch_size, num_classes=model.num_classes))
    step.run_loop(iterator, tf.constant(steps))
    return model, step


def accuracy(model, domain=None, num_examples=256, size=32, bn_mode=None):
    import numpy as np

    correct = total = 0
    for x, y in synthetic_batches(64, size, model.num_classes, "validation", num_examples):
        pred = np.argmax(model(x, training=False, domain=domain, bn_mode=bn_mode).numpy(), -1)
        correct += int((pred == y.numpy()).sum())
        total += len(pred)
    return correct / total


@functools.lru_cache(maxsize=None)
def two_cpu_strategy():
    """One MirroredStrategy over the two logical CPUs for the whole test session.

    Each new MirroredStrategy in a process restarts its collective keys, so two
    of them can collide on the same devices; a real run has only one.
    """
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def tiny_network(num_classes=10, domains=("clean", "adv"), dropout_rate=0.2, seed=0):
    """The smallest network with every part the step touches: two convs, two multi-domain BNs, dropout, dense.

    XLA compiles a step of it in about a second (the reduced EfficientNet takes ~15 s), so that every method
    can be compiled under every strategy in the suite.
    """
    import keras
    import tensorflow as tf

    from advprop_tf.models.base import MultiDomainNetwork
    from advprop_tf.models.dropout import SeededDropout
    from advprop_tf.models.multi_bn import MultiBatchNormalization

    class TinyNet(MultiDomainNetwork):
        @classmethod
        def variant_defaults(cls, model_name):
            return 1.0, 1.0, 16, dropout_rate, 0.0

        def __init__(self, **options):
            super().__init__("tiny", **options)
            self.convs = [keras.layers.Conv2D(c, 3, 2, padding="same", use_bias=False, name=f"conv{i}")
                          for i, c in enumerate((8, 16))]
            self.bns = [MultiBatchNormalization(self.domains, name=f"bn{i}") for i in range(2)]
            self.head_dropout = SeededDropout(self.dropout_rate, name="head_dropout") if self.dropout_rate else None
            self.classifier = keras.layers.Dense(self.num_classes, name="classifier")

        def weighted_layers(self):
            return [layer for pair in zip(self.convs, self.bns) for layer in pair] + [self.classifier]

        def features(self, pixels, training=None, domain=None, bn_mode=None):
            x = self.normalized_input(pixels)
            for conv, bn in zip(self.convs, self.bns):
                x = tf.nn.relu(bn(conv(x), training=training, domain=domain, bn_mode=bn_mode))
            return tf.reduce_mean(x, axis=[1, 2])

    keras.utils.set_random_seed(seed)
    return TinyNet(num_classes=num_classes, domains=domains, input_normalization="inception").build_weights()


def run_train_command(argv, capsys, with_stdout=False):
    """`python -m advprop_tf.train <argv>`, in this process on fresh flags (a process would spend ~7 s on
    imports per case): its exit status and stderr."""
    import pytest
    from absl import flags

    from advprop_tf import train

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        train.run(flags.FlagValues(), ["advprop_tf.train", *argv])
    captured = capsys.readouterr()
    return (exited.value.code, captured.err, captured.out) if with_stdout else (exited.value.code, captured.err)
