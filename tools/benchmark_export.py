"""Latency of the exported `predict_pixels` (B0, 224 px) against keras.applications.EfficientNetB0
exported the same way, loaded back from disk in one process; batch 1 and batch 32.

  python tools/benchmark_export.py [--json]
"""

import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("resolution", 224, "Input size.")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
flags.DEFINE_bool("json", False, "Print a JSON line last.")


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    from advprop_tf.benchmarking import time_interleaved
    from advprop_tf.serving import ServingModule, inference_network
    from advprop_tf.models import build_efficientnet

    size = FLAGS.resolution
    ours = inference_network(build_efficientnet("efficientnet-b0", domains=("clean", "adv"), resolution=size), "clean")
    theirs = keras.applications.EfficientNetB0(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    theirs.resolution = size
    loaded = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, network in (("ours", ours), ("keras", theirs)):
            module = ServingModule(network, {})
            path = os.path.join(tmp, name)
            tf.saved_model.save(module, path, signatures={"predict_pixels": module.predict_pixels})
            loaded[name] = tf.saved_model.load(path).signatures["predict_pixels"]
        results = {}
        for batch in (1, 32):
            pixels = tf.random.uniform([batch, size, size, 3], 0, 255)
            times = time_interleaved(
                {name: (lambda f=f: f(pixels=pixels)["logits"]) for name, f in loaded.items()},
                rounds=FLAGS.rounds, steps=20 if batch == 1 else 3,
            )
            results[f"ours_b{batch}_ms"] = round(times["ours"] * 1000, 2)
            results[f"keras_b{batch}_ms"] = round(times["keras"] * 1000, 2)
            results[f"ratio_b{batch}"] = round(times["ours"] / times["keras"], 3)
            print(f"batch {batch:2d}: ours {times['ours'] * 1000:8.2f} ms   keras {times['keras'] * 1000:8.2f} ms"
                  f"   ratio {times['ours'] / times['keras']:.3f}  (target <= 1.05)")
    if FLAGS.json:
        print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
