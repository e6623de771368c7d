"""Which keras.applications networks train with AdvProp: docs/keras_applications.md.

  python tools/keras_applications_table.py --output=docs/keras_applications.md [--names=ResNet50,VGG16]

Per constructor of keras.applications (weights=None: random weights; the conversion copies whatever
weights there are), at the smallest input it accepts (or --resolution):
  1. the conversion: `to_multi_domain` with its own preprocess_input inside (10 classes, logits, dropout
     rates 0): converted / refused (the reason, e.g. no BN) / failed; the number of BNs; the largest
     |difference| between the original's logits (on its preprocessed input) and the converted network's
     main domain on the same two random images in inference mode; the parameters each extra BN domain adds;
  2. the command line as a user runs it: `python -m advprop_tf.train --model=keras:<name>` for 2 steps
     with the default flags (AdvProp, its PGD attack, the EMA on) on the built-in synthetic data, then its
     evaluation and export: exit 0 with a SavedModel, or the exit status and its last line (2 and one line
     naming why for a network that is refused).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import importlib  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from advprop_tf.domains import MAIN  # noqa: E402
from advprop_tf.models.keras_conversion import (ConversionError, application_names, preprocessing_of,  # noqa: E402
                                                to_multi_domain, walk)

CANDIDATE_SIZES = (32, 64, 75, 96, 128, 224, 331)

flags.DEFINE_string("output", None, "Markdown file to write (any tf.io.gfile path); default: print only.")
flags.DEFINE_list("names", [], "Constructors to check (default: all of keras.applications).")
flags.DEFINE_integer("resolution", 0, "Input size; 0: the smallest of %s the network accepts." % (CANDIDATE_SIZES,))
flags.DEFINE_bool("train", True, "Also train 2 CLI steps at the default flags and export (a process per network).")
FLAGS = flags.FLAGS


def build_original(constructor, size):
    keras.utils.set_random_seed(0)
    try:
        return constructor(weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None), size
    except ValueError:  # e.g. NASNet needs its own size with a top
        model = constructor(weights=None, classes=10, classifier_activation=None)
        return model, int(model.input_shape[1])


def smallest_size(constructor):
    """The smallest candidate input the headless network (what --model=keras:<name> builds) accepts."""
    for size in CANDIDATE_SIZES:
        try:
            constructor(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
            return size
        except ValueError:
            continue
        finally:
            keras.backend.clear_session()
    return CANDIDATE_SIZES[-1]


def train_command(name, size, model_dir):
    """`python -m advprop_tf.train` as a user runs it: (status cell, seconds)."""
    started = time.time()
    command = [sys.executable, "-m", "advprop_tf.train", f"--model_dir={model_dir}", f"--model=keras:{name}",
               f"--resolution={size}", "--dataset=synthetic", "--synthetic_examples=64", "--train_batch_size=8",
               "--eval_batch_size=32", "--train_steps=2"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.time() - started
    exported = tf.io.gfile.exists(os.path.join(model_dir, "export", "1", "saved_model.pb"))
    if result.returncode == 0 and exported:
        return "trained, exported", seconds
    last = (result.stderr.strip().splitlines() or ["(no output)"])[-1][:160]
    return f"exit {result.returncode}: {last}", seconds


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
    lines = ["| network | conversion | BNs | max abs. logit difference (main domain vs original) | "
             "params per extra domain | % of the network | input | 2 CLI steps at the default flags, export | "
             "CLI seconds |", "|---|---|---|---|---|---|---|---|---|"]
    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            size = FLAGS.resolution or smallest_size(getattr(keras.applications, name))
            try:
                status, bns, diff, extra, share, note = check(name, size)
            except Exception as e:  # a network we cannot build or run here: say so, go on
                status, bns, diff, extra, share, note = "failed", "?", None, None, None, \
                    f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if status == "refused":
                note = f"{size} px; {note}"
            keras.backend.clear_session()
            gc.collect()
            trained, seconds = train_command(name, size, os.path.join(work, name)) if FLAGS.train else ("not run", 0)
            cells = [name, status, str(bns), "n/a" if diff is None else f"{diff:.1e}",
                     "n/a" if extra is None else f"{extra:,}", "n/a" if share is None else f"{share:.2f}", note,
                     trained, f"{seconds:.0f}"]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    if FLAGS.output:
        size = f"{FLAGS.resolution} px" if FLAGS.resolution else "each network's smallest input"
        header = (f"# keras.applications under `to_multi_domain` and `--model=keras:<name>`\n\nWritten by `python "
                  f"tools/keras_applications_table.py --output={FLAGS.output}` on {time.strftime('%Y-%m-%d')} (Keras "
                  f"{keras.__version__}, TensorFlow {tf.__version__}, {size}, weights=None, "
                  f"{time.time() - started:.0f} s in all).\n\n")
        with tf.io.gfile.GFile(FLAGS.output, "w") as f:
            f.write(header + table + "\n")
    print(f"{sum('| converted |' in line for line in lines)} of {len(names)} converted, "
          f"{sum('| trained, exported |' in line for line in lines)} trained and exported")


if __name__ == "__main__":
    app.run(main)
