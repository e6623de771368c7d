"""Which keras.applications networks `to_multi_domain` converts: docs/keras_applications.md.

  python tools/keras_applications_table.py --output=docs/keras_applications.md [--names=ResNet50,VGG16]

Every constructor of keras.applications is built with weights=None (random weights:
the conversion copies whatever weights there are) at --resolution px, 10 classes,
logits, dropout rates set to 0; then converted with its own preprocess_input inside.
Per network: converted / refused (the reason, e.g. no BN) / failed, the number of
BNs, the largest |difference| between the original's logits (on its preprocessed
input) and the converted network's main domain on the same two random images in
inference mode, and the parameters each extra BN domain adds.
"""

from __future__ import annotations

import gc
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from advprop_tf.domains import MAIN  # noqa: E402
from advprop_tf.models.keras_conversion import (ConversionError, application_names, preprocessing_of,  # noqa: E402
                                                to_multi_domain, walk)

flags.DEFINE_string("output", None, "Markdown file to write (any tf.io.gfile path); default: print only.")
flags.DEFINE_list("names", [], "Constructors to check (default: all of keras.applications).")
flags.DEFINE_integer("resolution", 96, "Input size (a network that refuses it is built at its smallest default).")
FLAGS = flags.FLAGS


def build_original(constructor, size):
    keras.utils.set_random_seed(0)
    try:
        return constructor(weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None), size
    except ValueError:  # e.g. NASNet needs its own size with a top
        model = constructor(weights=None, classes=10, classifier_activation=None)
        return model, int(model.input_shape[1])


def check(name, size):
    """One row: (status, BNs, max |logit difference|, params per extra domain, % of the network, note)."""
    constructor = getattr(keras.applications, name)
    original, size = build_original(constructor, size)
    for layer in walk(original):
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    bns = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in walk(original))
    try:
        network = to_multi_domain(original, input_normalization=preprocessing_of(constructor))
    except ConversionError as e:
        return "refused", bns, None, None, None, str(e).split(";")[0]
    pixels = tf.random.stateless_uniform([2, size, size, 3], (0, 1), 0, 255)
    preprocess = importlib.import_module(constructor.__module__).preprocess_input
    expected = original(preprocess(tf.identity(pixels)), training=False)
    got = network(pixels, training=False, domain=MAIN)
    diff = float(tf.reduce_max(tf.abs(tf.cast(expected, tf.float32) - got)))
    extra = network.count_params() - original.count_params()  # two domains: one extra
    return "converted", bns, diff, extra, 100.0 * extra / original.count_params(), f"{size} px"


def main(argv):
    del argv
    names = FLAGS.names or list(application_names())
    unknown = [n for n in names if n not in application_names()]
    if unknown:
        from advprop_tf import cli

        cli.fail("keras_applications_table", f"--names: keras.applications has no {', '.join(unknown)}")
    lines = ["| network | status | BNs | max abs. logit difference (main domain vs original) | "
             "params per extra domain | % of the network | note |", "|---|---|---|---|---|---|---|"]
    started = time.time()
    for name in names:
        try:
            status, bns, diff, extra, share, note = check(name, FLAGS.resolution)
        except Exception as e:  # a network we cannot build or run here: say so, go on
            status, bns, diff, extra, share, note = "failed", "?", None, None, None, \
                f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        cells = [name, status, str(bns), "n/a" if diff is None else f"{diff:.1e}",
                 "n/a" if extra is None else f"{extra:,}", "n/a" if share is None else f"{share:.2f}", note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        print(lines[-1], flush=True)
        keras.backend.clear_session()
        gc.collect()
    table = "\n".join(lines)
    if FLAGS.output:
        header = (f"# keras.applications under `to_multi_domain`\n\nWritten by `python tools/keras_applications_table.py "
                  f"--output={FLAGS.output}` (Keras {keras.__version__}, TensorFlow {tf.__version__}, "
                  f"{FLAGS.resolution} px, weights=None, {time.time() - started:.0f} s).\n\n")
        with tf.io.gfile.GFile(FLAGS.output, "w") as f:
            f.write(header + table + "\n")
    print(f"{sum('| converted |' in line for line in lines)} of {len(names)} converted")


if __name__ == "__main__":
    app.run(main)
