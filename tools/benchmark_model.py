"""Training-step time of our networks against their keras.applications twin, in one process.

Prints per-step times and two ratios:
  ours_vs_keras: our one-domain model / keras.applications' (EfficientNetB0..B7, ResNet50/101/152;
                 Keras' ResNets are v1: stride on the 1x1 conv, conv biases, ~7% fewer FLOPs than v1.5);
  split_vs_single: two-domain model on a concatenated clean+adv batch with
                   domain=("clean", "adv") / one-domain model on the same batch.

  python tools/benchmark_model.py --resolution=224 --batch_size=16
  python tools/benchmark_model.py --model=resnet-50 --resolution=224 --batch_size=16
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "efficientnet-b0", "Model with a Keras twin: efficientnet-b0..b7, resnet-50/101/152.")
flags.DEFINE_integer("resolution", 224, "Input size in pixels.")
flags.DEFINE_integer("batch_size", 16, "Global batch size (split model: half clean, half adv).")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
flags.DEFINE_integer("steps", 3, "Steps per round.")
flags.DEFINE_bool("jit_compile", False, "Compile the steps with XLA.")
flags.DEFINE_bool("json", False, "Also print a JSON line at the end.")


def make_train_step(model, call_kwargs, jit_compile):
    import keras
    import tensorflow as tf

    optimizer = keras.optimizers.RMSprop(0.01, rho=0.9, momentum=0.9, epsilon=1e-3)
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=jit_compile)
    def step(pixels, labels):
        with tf.GradientTape() as tape:
            logits = model(pixels, training=True, **call_kwargs)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.cast(logits, tf.float32))
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    from advprop_tf.benchmarking import time_interleaved
    from advprop_tf.cli import fail
    from advprop_tf.models import build_model
    from advprop_tf.models.keras_weights import KERAS_APPLICATIONS

    twins = {**KERAS_APPLICATIONS, "resnet-50": "ResNet50", "resnet-101": "ResNet101", "resnet-152": "ResNet152"}
    if FLAGS.model not in twins:
        fail("benchmark_model", f"--model: no keras.applications twin for {FLAGS.model!r}; valid: {', '.join(twins)}")

    size, batch = FLAGS.resolution, FLAGS.batch_size
    if batch % 2:
        fail("benchmark_model", "--batch_size: must be even (half clean, half adversarial)")
    pixels = tf.random.uniform([batch, size, size, 3], 0, 255)
    labels = tf.random.uniform([batch], 0, 1000, tf.int32)

    keras_model = getattr(keras.applications, twins[FLAGS.model])(
        weights=None, input_shape=(size, size, 3)
    )
    keras_model.layers[-1].activation = keras.activations.linear  # logits, like ours
    ours_one = build_model(FLAGS.model, domains=("clean",))
    ours_two = build_model(FLAGS.model, domains=("clean", "adv"))

    steps = {
        "keras": make_train_step(keras_model, {}, FLAGS.jit_compile),
        "ours_one_domain": make_train_step(ours_one, {}, FLAGS.jit_compile),
        "ours_two_domain_split": make_train_step(ours_two, {"domain": ("clean", "adv")}, FLAGS.jit_compile),
    }
    times = time_interleaved(
        {k: (lambda s=s: s(pixels, labels)) for k, s in steps.items()},
        rounds=FLAGS.rounds, steps=FLAGS.steps,
    )
    result = {
        "model": FLAGS.model, "resolution": size, "batch_size": batch,
        "jit_compile": FLAGS.jit_compile,
        **{f"{k}_s": round(v, 4) for k, v in times.items()},
        "ours_vs_keras": round(times["ours_one_domain"] / times["keras"], 3),
        "split_vs_single": round(times["ours_two_domain_split"] / times["ours_one_domain"], 3),
    }
    print(f"{FLAGS.model} train step, {size}px, batch {batch}, jit_compile={FLAGS.jit_compile}")
    for k, v in times.items():
        print(f"  {k:24s} {v:.4f} s/step  {batch / v:7.1f} images/s")
    print(f"  ratio ours/keras          {result['ours_vs_keras']:.3f}   (target <= 1.05)")
    print(f"  ratio split/single-domain {result['split_vs_single']:.3f}   (target <= 1.10)")
    if FLAGS.json:
        print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
