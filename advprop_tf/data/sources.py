"""Where images come from: TFDS, ImageNet TFRecords, image folders, the synthetic set.

Every source yields (image, label) with integer labels from 0. `image` is
either encoded bytes (tf.string: JPEG/PNG, decoded by the preprocessing) or,
for the synthetic set, a uint8 [H, W, 3] tensor.

Spec strings (one flag):
  synthetic                 the built-in procedural set (no download)
  folder:<dir>              one sub-folder per class, ids by sorted folder name
  tfrecord:<dir or glob>    the authors' ImageNet shards (train-*, validation-*)
  tfds:<name>[/<config>]    any prepared TFDS image-classification dataset
"""

from __future__ import annotations

import collections
import dataclasses
import posixpath
import zlib

import tensorflow as tf
from absl import logging

from advprop_tf.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from advprop_tf.errors import ConfigError
from advprop_tf.data.synthetic import synthetic_dataset
from advprop_tf.paths import basename as _basename
from advprop_tf.paths import join as _join

# What tf.io.decode_image reads (any letter case): a folder's other files are left out, and counted.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
SOURCE_KINDS = ("synthetic", "folder", "tfrecord", "tfds")


class SourceError(ConfigError):
    """A data source that cannot be used; the reason says which and why (field: dataset)."""

    def __init__(self, reason: str, field: str = "dataset"):
        super().__init__(field, reason)


@dataclasses.dataclass
class Source:
    kind: str
    location: str
    num_classes: int
    class_names: tuple | None
    encoded: bool  # True: images are encoded bytes; False: uint8 tensors
    _datasets: dict  # split -> callable(input_context, shuffle_seed) -> tf.data.Dataset
    _counts: dict  # split -> number of examples (None when unknown)

    @property
    def splits(self):
        return tuple(self._datasets)

    def num_examples(self, split: str):
        return self._counts.get(split)

    # Sources that can shuffle their whole index (file names, example ids)
    # before reading anything; the others need a shuffle buffer of records.
    shuffles_index: bool = False
    # Whether num_classes was read from the data (folders, TFDS) rather than given (TFRecords).
    num_classes_known: bool = True

    def dataset(self, split: str, input_context: tf.distribute.InputContext | None = None,
                shuffle_seed: int | None = None):
        """(image, label) pairs; with `shuffle_seed` (index-shuffling sources) in a new order each epoch."""
        if split not in self._datasets:
            raise SourceError(f"{self.kind} source {self.location!r} has no split {split!r}; it has {self.splits}")
        return self._datasets[split](input_context, shuffle_seed)


def parse_source(spec: str, data_dir: str | None = None, num_classes: int | None = None,
                 holdout_fraction: float = 0.0, synthetic_size: int = 64,
                 synthetic_examples: int = 10_000, seed: int = 0) -> Source:
    """Open the source named by `spec` (see the module docstring)."""
    kind, _, location = spec.partition(":")
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown data source {spec!r}; valid kinds: {', '.join(SOURCE_KINDS)}")
    if kind == "synthetic":
        return _synthetic(num_classes or 10, synthetic_size, synthetic_examples, seed)
    location = location or (data_dir or "")
    if not location:
        raise SourceError(f"data source {kind!r} needs a location: '{kind}:<path>' or --data_dir")
    if kind == "folder":
        return _folder(location, holdout_fraction)
    if kind == "tfrecord":
        return _tfrecord(location, num_classes or 1000)
    return _tfds(location, data_dir)


# ------------------------------------------------------------------ synthetic
def _synthetic(num_classes, size, num_examples, seed):
    def make(split, n):
        def build(ctx, shuffle_seed):
            return synthetic_dataset(split, n, size, num_classes, seed, shuffle_seed, ctx)

        return build

    eval_examples = max(num_classes * 20, num_examples // 10)
    return Source(
        "synthetic", "built-in", num_classes, SYNTHETIC_CLASS_NAMES[:num_classes], False,
        {"train": make("train", num_examples), "validation": make("validation", eval_examples)},
        {"train": num_examples, "validation": eval_examples}, shuffles_index=True,
    )


def _shard(ds, ctx):
    if ctx is not None and ctx.num_input_pipelines > 1:
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    return ds


def _shuffled(ds, size, seed):
    if seed is None:
        return ds
    return ds.shuffle(max(1, size), seed=seed, reshuffle_each_iteration=True)


# --------------------------------------------------------------------- folder
def folder_files(root, holdout_fraction):
    """({split: [(path, class index, class name)]}, class names) of an image folder.

    Class ids follow the sorted folder names; a file is held out for
    validation by the CRC of "<class>/<file name>", so the split is the same
    on every machine (and in tools/images_to_tfrecords.py).
    """
    root = root.rstrip("/") or root
    if not tf.io.gfile.isdir(root):
        raise SourceError(f"image folder {root!r} does not exist or is not a directory")
    if not 0.0 <= holdout_fraction < 1.0:
        raise SourceError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    # One listing of the root; object stores list sub-folders with a trailing '/'.
    classes = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root) if tf.io.gfile.isdir(_join(root, d.rstrip("/"))))
    if not classes:
        raise SourceError(f"image folder {root!r} has no class sub-folders")
    files = {"train": [], "validation": []}
    left_out = collections.Counter()
    for label, name in enumerate(classes):
        for file_name in sorted(tf.io.gfile.listdir(_join(root, name))):
            if file_name.endswith("/"):  # a nested folder
                left_out["(folders)"] += 1
                continue
            if not file_name.lower().endswith(IMAGE_EXTENSIONS):
                left_out[posixpath.splitext(file_name)[1].lower() or "(no extension)"] += 1
                continue
            path = _join(root, name, file_name)
            key = zlib.crc32(f"{name}/{file_name}".encode()) % 10_000
            split = "validation" if key < holdout_fraction * 10_000 else "train"
            files[split].append((path, label, name))
    if left_out:
        logging.warning("image folder %s: left out %d entries that are not images TensorFlow decodes (%s); "
                        "read: %s", root, sum(left_out.values()),
                        ", ".join(f"{ext} {n}" for ext, n in sorted(left_out.items())), "/".join(IMAGE_EXTENSIONS))
    if not files["train"] and not files["validation"]:
        raise SourceError(f"image folder {root!r} has no image files ({'/'.join(IMAGE_EXTENSIONS)}) "
                          "in its class folders")
    return files, tuple(classes)


def _folder(root, holdout_fraction):
    files, classes = folder_files(root, holdout_fraction)

    def make(split):
        paths = [entry[0] for entry in files[split]]
        labels = [entry[1] for entry in files[split]]

        def build(ctx, shuffle_seed):
            ds = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int32)))
            ds = _shuffled(_shard(ds, ctx), len(paths), shuffle_seed)
            return ds.map(lambda p, l: (tf.io.read_file(p), l), num_parallel_calls=tf.data.AUTOTUNE)

        return build

    splits = [s for s in ("train", "validation") if files[s]]
    return Source("folder", root, len(classes), tuple(classes), True,
                  {s: make(s) for s in splits}, {s: len(files[s]) for s in splits}, shuffles_index=True)


# ------------------------------------------------------------------- tfrecord
TFRECORD_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def parse_imagenet_record(record):
    """The authors' ImageNet TFRecord: JPEG bytes and a 1-based label -> (bytes, 0-based label)."""
    parsed = tf.io.parse_single_example(record, TFRECORD_FEATURES)
    return parsed["image/encoded"], tf.cast(parsed["image/class/label"], tf.int32) - 1


TFRECORD_SPLITS = ("train", "validation")


def tfrecord_split_files(location):
    """{split: sorted shard paths} of a directory, a '{split}' pattern, or a glob.

    A directory or a glob is split by the shards' names, train-* and
    validation-* (the authors' converter's): one pattern never serves as both
    splits, so validation accuracy is never measured on training shards.
    """
    if "{split}" in location:
        files = {s: sorted(tf.io.gfile.glob(location.format(split=s))) for s in TFRECORD_SPLITS}
        searched = [location.format(split=s) for s in TFRECORD_SPLITS]
    else:
        pattern = _join(location, "*") if tf.io.gfile.isdir(location) else location
        matched = sorted(p for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p))
        files = {s: [p for p in matched if _basename(p).startswith(f"{s}-")] for s in TFRECORD_SPLITS}
        others = sorted(set(matched) - set(files["train"]) - set(files["validation"]))
        if others and not tf.io.gfile.isdir(location):
            raise SourceError(
                f"TFRecord pattern {location!r} matches {len(others)} files that are neither train-* nor "
                f"validation-* (e.g. {_basename(others[0])!r}); one pattern cannot tell the splits apart: "
                "name the shards train-*/validation-* (tools/images_to_tfrecords.py does) or give a pattern "
                "with {split}, e.g. gs://bucket/imagenet/{split}-*")
        searched = [pattern]
    files = {s: f for s, f in files.items() if f}
    if not files:
        raise SourceError(f"no TFRecord files named train-*/validation-* match {', '.join(searched)}")
    return files


def _tfrecord(location, num_classes):
    files = tfrecord_split_files(location)

    def make(split):
        def build(ctx, shuffle_seed):
            ds = tf.data.Dataset.from_tensor_slices(files[split])
            # One shard subset per input pipeline, then interleaved reading.
            ds = _shard(ds, ctx)
            if shuffle_seed is not None:
                ds = ds.shuffle(len(files[split]), seed=shuffle_seed, reshuffle_each_iteration=True)
            ds = ds.interleave(
                lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
                cycle_length=min(16, len(files[split])), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=split != "train",
            )
            return ds.map(parse_imagenet_record, num_parallel_calls=tf.data.AUTOTUNE)

        return build

    return Source("tfrecord", location, num_classes, None, True,
                  {s: make(s) for s in files}, {s: None for s in files}, num_classes_known=False)


# ----------------------------------------------------------------------- tfds
def _tfds(name, data_dir):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name or config
        raise SourceError(f"TFDS dataset {name!r} is not available: {e}") from None
    try:  # opening a split is lazy and cheap; it fails when nothing was prepared
        builder.as_dataset(split=list(builder.info.splits)[0] if builder.info.splits else "train")
    except Exception:
        raise SourceError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; prepare it on a "
            f"machine with network access (`tfds build {name} --data_dir=...` or "
            f"`tfds.builder({name!r}).download_and_prepare()`) and pass --data_dir"
        ) from None
    info = builder.info
    label_feature = info.features["label"]
    # (Builders without recorded split info, e.g. under tfds.testing.mock_data, get train/test.)
    available = set(info.splits) or {"train", "test"}
    split_names = {"train": "train", "validation": "validation" if "validation" in available else "test"}
    split_names = {k: v for k, v in split_names.items() if v in available}

    def make(split):
        def build(ctx, shuffle_seed):
            read_config = tfds.ReadConfig(input_context=ctx, shuffle_seed=shuffle_seed)
            ds = builder.as_dataset(
                split=split_names[split], shuffle_files=shuffle_seed is not None, read_config=read_config,
                decoders={"image": tfds.decode.SkipDecoding()},
            )
            return ds.map(lambda e: (e["image"], tf.cast(e["label"], tf.int32)))

        return build

    return Source(
        "tfds", name, label_feature.num_classes, tuple(label_feature.names), True,
        {s: make(s) for s in split_names},
        {s: info.splits[v].num_examples if v in info.splits else None for s, v in split_names.items()},
    )
