"""Small builders shared by the tests."""

import functools


def tiny_model(num_classes=10, domains=("clean", "adv"), **kwargs):
    """A reduced B0 (few channels, one block per stage) for fast tests."""
    from advprop_tf.models import build_efficientnet

    kwargs.setdefault("width_coefficient", 0.25)
    kwargs.setdefault("depth_coefficient", 0.25)
    kwargs.setdefault("resolution", 32)
    return build_efficientnet(
        "efficientnet-b0", num_classes=num_classes, domains=domains, **kwargs
    )


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
    from advprop_tf.methods import AttackConfig, get_method
    from advprop_tf.training.optimization import make_optimizer, make_schedule
    from advprop_tf.training.step import StepConfig, TrainStep

    import keras

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
    step.run_loop(iterator, steps)
    return model, step


def accuracy(model, domain=None, num_examples=256, size=32):
    import numpy as np

    correct = total = 0
    for x, y in synthetic_batches(64, size, model.num_classes, "validation", num_examples):
        pred = np.argmax(model(x, training=False, domain=domain).numpy(), -1)
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
