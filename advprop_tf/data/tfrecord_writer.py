"""Write an image folder as sharded TFRecords in the authors' ImageNet format.

Each example holds image/encoded (JPEG bytes; PNGs are re-encoded as JPEG as
the authors' converter does), image/format "JPEG", image/class/label (1-based),
image/class/synset (the folder name), image/class/text, image/height,
image/width, image/channels, image/colorspace and image/filename. Files are
named <split>-00000-of-0000N. The held-out split uses the same rule as the
`folder:` source, so folder and TFRecords hold the same validation images.
Undecodable files are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable

import tensorflow as tf

from advprop_tf.data.sources import folder_files
from advprop_tf.paths import basename, join


@dataclasses.dataclass
class WriteReport:
    written: dict  # split -> examples
    skipped: list  # files that could not be decoded
    files: dict  # split -> shard paths


def _feature(value):
    if isinstance(value, int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    if isinstance(value, str):
        value = value.encode()
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def encode_example(path: str, label: int, synset: str):
    """The serialized tf.train.Example of one file, or None if it cannot be decoded."""
    data = tf.io.read_file(path)
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        return None
    raw = data.numpy()
    if not raw.startswith(b"\xff\xd8"):  # PNG (or other): store as JPEG
        raw = tf.io.encode_jpeg(image, quality=95).numpy()
    height, width = int(image.shape[0]), int(image.shape[1])
    features = {
        "image/encoded": _feature(raw),
        "image/format": _feature("JPEG"),
        "image/class/label": _feature(label + 1),
        "image/class/synset": _feature(synset),
        "image/class/text": _feature(synset),
        "image/height": _feature(height),
        "image/width": _feature(width),
        "image/channels": _feature(3),
        "image/colorspace": _feature("RGB"),
        "image/filename": _feature(basename(path)),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def write_tfrecords(root: str, output_dir: str, train_shards: int = 16, validation_shards: int = 4,
                    holdout_fraction: float = 0.0, seed: int = 12345,
                    progress: Callable[[str], None] | None = None) -> WriteReport:
    """Convert the folder `root` into shards under `output_dir`; returns what was written."""
    splits, _ = folder_files(root, holdout_fraction)
    shards = {"train": train_shards, "validation": validation_shards}
    for split, n in shards.items():
        if n < 1:
            raise ValueError(f"--{split}_shards: must be >= 1, got {n}")
    tf.io.gfile.makedirs(output_dir)
    report = WriteReport({}, [], {})
    started, done = time.time(), 0
    total = sum(len(v) for v in splits.values())
    for split, entries in splits.items():
        if not entries:
            continue
        entries = list(entries)
        random.Random(seed).shuffle(entries)  # classes mixed within every shard
        n = min(shards[split], len(entries))
        paths = [join(output_dir, f"{split}-{i:05d}-of-{n:05d}") for i in range(n)]
        writers = [tf.io.TFRecordWriter(p + ".tmp") for p in paths]
        written = 0
        for index, (path, label, synset) in enumerate(entries):
            example = encode_example(path, label, synset)
            done += 1
            if example is None:
                report.skipped.append(path)
                continue
            writers[index % n].write(example)
            written += 1
            if progress is not None and done % 500 == 0:
                rate = done / (time.time() - started)
                progress(f"{done}/{total} images | {rate:.0f} img/s | ETA {int((total - done) / rate)} s")
        for writer, path in zip(writers, paths):
            writer.close()
            tf.io.gfile.rename(path + ".tmp", path, overwrite=True)  # a shard appears only when complete
        report.written[split] = written
        report.files[split] = paths
    return report
