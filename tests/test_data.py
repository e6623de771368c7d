"""Data sources and preprocessing, on images the tests write themselves."""

import os

import numpy as np
import pytest
import tensorflow as tf

from advprop_tf.data.pipeline import DecodeStats, check_readable, eval_dataset, train_dataset
from advprop_tf.data.preprocessing import (
    center_crop_window,
    eval_crop_padding,
    is_decodable_image,
    preprocess_eval,
    preprocess_train,
)
from advprop_tf.data.sources import SourceError, parse_source
from advprop_tf.data.synthetic import synthetic_dataset


def gradient_image(height, width, seed=0):
    """A deterministic image whose pixels encode their position (to check crops)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([y * 255 // max(1, height - 1), x * 255 // max(1, width - 1),
                      rng.integers(0, 255, (height, width))], -1)
    return image.astype(np.uint8)


def write_image(path, image, fmt="jpeg"):
    encoded = tf.io.encode_jpeg(image, quality=95) if fmt == "jpeg" else tf.io.encode_png(image)
    tf.io.write_file(str(path), encoded)


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 6 images (JPEG and PNG), plus a non-image file that must be ignored."""
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "ant", "bee"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            fmt = "png" if i % 3 == 0 else "jpeg"
            write_image(root / name / f"img{i}.{'png' if fmt == 'png' else 'jpg'}",
                        gradient_image(40 + 4 * i, 50, seed=c * 10 + i), fmt)
        (root / name / "notes.txt").write_text("not an image")
    return root


def test_folder_classes_by_sorted_name_and_holdout_is_deterministic(image_folder):
    source = parse_source(f"folder:{image_folder}", holdout_fraction=0.3)
    assert source.class_names == ("ant", "bee", "cat") and source.num_classes == 3
    train, val = source.num_examples("train"), source.num_examples("validation")
    assert train + val == 18 and val > 0 and train > 0
    again = parse_source(f"folder:{image_folder}", holdout_fraction=0.3)
    files = lambda s: [p.numpy() for p, _ in s.dataset("validation").map(lambda d, l: (d, l))]
    assert files(source) == files(again)
    labels = sorted(int(l) for _, l in source.dataset("train"))
    assert set(labels) <= {0, 1, 2}


def test_folder_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        parse_source(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class sub-folders"):
        parse_source(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(SourceError, match=r"has no image files \(.jpg/.jpeg/.png/.gif/.bmp/.webp\)"):
        parse_source(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(SourceError, match="unknown data source 'imagenet'.*synthetic, folder, tfrecord, tfds"):
        parse_source("imagenet")
    with pytest.raises(SourceError, match="needs a location"):
        parse_source("folder")


def write_tfrecords(directory, split, examples, shards=2):
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        path = directory / f"{split}-{shard:05d}-of-{shards:05d}"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for i, (image, label) in enumerate(examples):
                if i % shards != shard:
                    continue
                feature = {
                    "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.encode_jpeg(image).numpy()])),
                    "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                    "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"JPEG"])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def test_tfrecord_labels_are_one_based_in_files_and_zero_based_out(tmp_path):
    examples = [(gradient_image(32, 32, i), 1 + i % 4) for i in range(12)]  # labels 1..4 as the authors
    write_tfrecords(tmp_path / "records", "train", examples)
    write_tfrecords(tmp_path / "records", "validation", examples[:4], shards=1)
    source = parse_source(f"tfrecord:{tmp_path / 'records'}", num_classes=4)
    assert source.splits == ("train", "validation")
    labels = sorted(int(l) for _, l in source.dataset("validation"))
    assert labels == [0, 1, 2, 3]
    batch = next(iter(train_dataset(source, 32, 6, seed=0)))
    assert batch[0].shape == (6, 32, 32, 3) and batch[0].dtype == tf.float32
    assert set(batch[1].numpy()) <= {0, 1, 2, 3}
    with pytest.raises(SourceError, match="no TFRecord files"):
        parse_source(f"tfrecord:{tmp_path / 'nothing'}")


def test_tfrecord_shards_are_split_between_input_pipelines(tmp_path):
    examples = [(gradient_image(16, 16, i), 1 + i) for i in range(8)]
    write_tfrecords(tmp_path / "r", "train", examples, shards=4)
    source = parse_source(f"tfrecord:{tmp_path / 'r'}/train-*", num_classes=8)
    seen = []
    for pipeline in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2)
        seen.append({int(l) for _, l in source.dataset("train", ctx)})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(8))


def test_tfds_source_on_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        source = parse_source("tfds:cifar10")
        assert source.num_classes == 10 and source.splits == ("train", "validation")
        labels = [int(l) for _, l in source.dataset("validation")]
        assert len(labels) == 6 and all(0 <= l < 10 for l in labels)
        batch = next(iter(train_dataset(source, 32, 3, seed=0)))
        assert batch[0].shape == (3, 32, 32, 3)
        assert batch[0].numpy().min() >= 0 and batch[0].numpy().max() <= 255


def test_tfds_not_prepared_says_where_and_how(tmp_path):
    with pytest.raises(SourceError, match=rf"not prepared in '{tmp_path}.*tfds build imagenette"):
        parse_source("tfds:imagenette", data_dir=str(tmp_path))


def test_eval_crop_is_the_authors_center_crop():
    image = gradient_image(300, 400)
    size = 224
    assert eval_crop_padding(224) == 32
    window = center_crop_window(tf.constant([300, 400, 3]), size).numpy()
    crop = int(224 / 256 * 300)  # 262
    assert list(window) == [(300 - crop + 1) // 2, (400 - crop + 1) // 2, crop, crop]
    out = preprocess_eval(tf.constant(image), size).numpy()
    y0, x0 = window[:2]
    expected = tf.image.resize(image[y0:y0 + crop, x0:x0 + crop].astype(np.float32), [size, size], "bicubic")
    np.testing.assert_allclose(out, np.clip(expected, 0, 255), atol=1e-3)
    # the same through JPEG bytes: decode_and_crop_jpeg decodes only that window
    jpeg = tf.io.encode_jpeg(image, quality=100)
    decoded = tf.io.decode_jpeg(jpeg).numpy()
    via_bytes = preprocess_eval(jpeg, size).numpy()
    expected = tf.image.resize(decoded[y0:y0 + crop, x0:x0 + crop].astype(np.float32), [size, size], "bicubic")
    np.testing.assert_allclose(via_bytes, np.clip(expected, 0, 255), atol=1e-2)


def test_train_crop_statistics():
    """Crops cover 8%..100% of the image with aspect 3/4..4/3; flips happen about half the time."""
    shape = tf.constant([200, 300, 3])
    from advprop_tf.data.preprocessing import distorted_crop_window

    areas, aspects, fallbacks = [], [], 0
    for i in range(400):
        window, ok = distorted_crop_window(shape, seed=tf.constant([7, i]))
        y, x, h, w = window.numpy()
        assert y >= 0 and x >= 0 and y + h <= 200 and x + w <= 300
        if not ok:
            fallbacks += 1
            continue
        areas.append(h * w / (200 * 300))
        aspects.append(w / h)
    assert min(areas) >= 0.08 - 0.01 and max(areas) <= 1.0
    # Targets are uniform in [0.08, 1]; large boxes that do not fit the image's
    # aspect are retried, so the mean area lands near 0.35 (as on ImageNet).
    assert 0.25 < np.mean(areas) < 0.6
    assert min(areas) < 0.12 and max(areas) > 0.8
    assert min(aspects) >= 0.75 * 0.95 and max(aspects) <= 4 / 3 * 1.05
    assert fallbacks < 40
    image = tf.constant(gradient_image(200, 300))
    outs = [preprocess_train(image, 64, seed=tf.constant([1, i])) for i in range(40)]
    assert all(o.shape == (64, 64, 3) and o.dtype == tf.float32 for o in outs)
    assert all(0 <= float(tf.reduce_min(o)) and float(tf.reduce_max(o)) <= 255 for o in outs)
    # channel 1 grows left to right unless flipped
    flipped = sum(float(tf.reduce_mean(o[:, :8, 1])) > float(tf.reduce_mean(o[:, -8:, 1])) for o in outs)
    assert 8 <= flipped <= 32
    # same seed, same output
    np.testing.assert_array_equal(preprocess_train(image, 64, seed=tf.constant([3, 3])),
                                  preprocess_train(image, 64, seed=tf.constant([3, 3])))


def test_corrupt_files_are_skipped_and_counted(image_folder):
    good = tf.io.read_file(str(next(image_folder.glob("ant/*.jpg"))))
    (image_folder / "ant" / "truncated.jpg").write_bytes(good.numpy()[: len(good.numpy()) // 2])
    (image_folder / "bee" / "garbage.jpg").write_bytes(b"this is not a jpeg at all, just text" * 10)
    (image_folder / "cat" / "empty.png").write_bytes(b"")
    assert not bool(is_decodable_image(tf.constant(b"")))
    assert bool(is_decodable_image(good))
    source = parse_source(f"folder:{image_folder}")
    stats = DecodeStats()
    n = sum(int(tf.shape(l)[0]) for _, l in eval_dataset(source, 32, 5, split="train", stats=stats))
    assert n == 18  # every good image, none of the 3 corrupt ones
    assert int(stats.skipped.numpy()) == 3
    batch = next(iter(train_dataset(source, 32, 4, seed=1, stats=stats)))
    assert batch[0].shape == (4, 32, 32, 3)


def test_source_with_no_readable_image_fails_clearly(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"broken")
    source = parse_source(f"folder:{tmp_path}")
    with pytest.raises(SourceError, match="has no readable image in its 'train' split"):
        check_readable(source)
    write_image(tmp_path / "a" / "y.jpg", gradient_image(20, 20))
    check_readable(parse_source(f"folder:{tmp_path}"))


def test_synthetic_is_deterministic_and_balanced():
    a = [x.numpy() for x, _ in synthetic_dataset("train", 20, 48, 10, seed=0)]
    b = [x.numpy() for x, _ in synthetic_dataset("train", 20, 48, 10, seed=0)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    labels = [int(l) for _, l in synthetic_dataset("train", 100, 32, 10)]
    assert np.bincount(labels).tolist() == [10] * 10
    val = next(iter(synthetic_dataset("validation", 1, 48)))[0].numpy()
    assert not np.array_equal(val, a[0])
    assert a[0].shape == (48, 48, 3) and a[0].dtype == np.uint8


def test_train_pipeline_is_deterministic_by_seed_and_yields_views():
    source = parse_source("synthetic", synthetic_size=40, synthetic_examples=64)
    take = lambda seed: [x.numpy() for x, _ in train_dataset(source, 32, 8, seed=seed).take(2)]
    np.testing.assert_array_equal(take(5), take(5))
    assert not np.array_equal(take(5)[0], take(6)[0])
    views, labels = next(iter(train_dataset(source, 32, 4, seed=0, views=("randaugment",))))
    assert set(views) == {"clean", "randaugment"}
    assert views["randaugment"].shape == views["clean"].shape == (4, 32, 32, 3)
    assert float(tf.reduce_min(views["randaugment"])) >= 0 and float(tf.reduce_max(views["randaugment"])) <= 255
    with pytest.raises(SourceError, match="unknown input view 'cutmix'"):
        train_dataset(source, 32, 4, views=("cutmix",))


def test_eval_padding_marks_padded_examples():
    source = parse_source("synthetic", synthetic_size=40, synthetic_examples=100)
    batches = list(eval_dataset(source, 32, 64, pad_to_batch=True))
    labels = np.concatenate([l.numpy() for _, l in batches])
    assert all(x.shape[0] == 64 for x, _ in batches)
    assert (labels >= 0).sum() == source.num_examples("validation") and (labels == -1).sum() == 64 * len(batches) - (labels >= 0).sum()


# ------------------------------------------------------------- AutoAugment
def test_autoaugment_policy_v0_is_the_authors():
    from advprop_tf.data.autoaugment import POLICY_V0

    assert len(POLICY_V0) == 25 and all(len(sub) == 2 for sub in POLICY_V0)
    assert POLICY_V0[0] == (("Equalize", 0.8, 1), ("ShearY", 0.8, 4))
    assert POLICY_V0[15] == (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9))
    assert POLICY_V0[24] == (("Color", 0.8, 6), ("Rotate", 0.4, 5))


def test_autoaugment_operations_on_known_images():
    from PIL import Image, ImageOps

    from advprop_tf.data import augment_ops as aa

    rng = np.random.default_rng(0)
    skewed = (rng.uniform(0, 1, (32, 32, 3)) ** 2 * 255).astype(np.uint8)
    image = tf.constant(skewed.astype(np.float32))
    np.testing.assert_array_equal(aa.equalize(image).numpy(), np.asarray(ImageOps.equalize(Image.fromarray(skewed))))
    np.testing.assert_allclose(aa.autocontrast(image).numpy(),
                               np.asarray(ImageOps.autocontrast(Image.fromarray(skewed))), atol=1.0)
    np.testing.assert_array_equal(aa.solarize(image, 128.0).numpy(),
                                  np.where(skewed < 128, skewed, 255 - skewed))
    np.testing.assert_array_equal(aa.posterize(image, 2).numpy(), skewed & 0b11000000)
    # uint8 shifts out of [0, 7] are clamped by TensorFlow in the authors' code: 0 bits keeps the top bit
    np.testing.assert_array_equal(aa.posterize(image, 0).numpy(), skewed & 0b10000000)
    np.testing.assert_array_equal(aa.posterize(image, 11).numpy(), skewed)
    square = tf.constant(np.arange(48, dtype=np.float32).reshape(4, 4, 3))
    np.testing.assert_array_equal(aa.rotate(square, tf.constant(90.0)).numpy(), tf.image.rot90(square).numpy())
    shifted = aa.translate_y(square, tf.constant(1.0)).numpy()
    np.testing.assert_array_equal(shifted[1:], square.numpy()[:-1])
    np.testing.assert_array_equal(shifted[0], 128.0)  # the authors' grey fill
    np.testing.assert_array_equal(aa.color(image, 1.0).numpy(), skewed)  # level 5 = factor 1.0: unchanged
    gray = aa.color(image, 0.0).numpy()
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_autoaugment_in_the_pipeline_is_seeded_and_stays_stateless():
    from advprop_tf.data.autoaugment import autoaugment

    image = tf.constant(gradient_image(48, 48).astype(np.float32))
    outputs = [autoaugment(image, tf.constant([3, i])).numpy() for i in range(10)]
    np.testing.assert_array_equal(outputs[0], autoaugment(image, tf.constant([3, 0])).numpy())
    assert sum(not np.array_equal(o, image.numpy()) for o in outputs) >= 5  # most draws change the image
    for out in outputs:
        assert out.shape == (48, 48, 3) and out.min() >= 0 and out.max() <= 255
        np.testing.assert_array_equal(out, np.round(out))
    source = parse_source("synthetic", num_classes=4, synthetic_size=40, synthetic_examples=64)
    first = train_dataset(source, 32, 8, augment="autoaugment", views=("autoaugment",), seed=5)
    second = train_dataset(source, 32, 8, augment="autoaugment", views=("autoaugment",), seed=5)
    (a, _), (b, _) = next(iter(first)), next(iter(second))
    np.testing.assert_array_equal(a["clean"].numpy(), b["clean"].numpy())
    assert not np.array_equal(a["clean"].numpy(), a["autoaugment"].numpy())  # the view is drawn apart
    iterator = iter(first)  # stateless: the iterator can be checkpointed
    tf.train.Checkpoint(iterator=iterator).write(os.path.join(os.environ.get("TMPDIR", "/tmp"), "aa_iter_ckpt"))


# ------------------------------------------------------------- TFRecord writer
def test_images_to_tfrecords_writes_the_authors_format(image_folder, tmp_path):
    from advprop_tf.data.tfrecord_writer import write_tfrecords

    (image_folder / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    report = write_tfrecords(str(image_folder), str(tmp_path / "records"), train_shards=3,
                             validation_shards=2, holdout_fraction=0.3)
    assert report.skipped == [str(image_folder / "bee" / "broken.jpg")]
    assert sorted(os.listdir(tmp_path / "records")) == [
        "train-00000-of-00003", "train-00001-of-00003", "train-00002-of-00003",
        "validation-00000-of-00002", "validation-00001-of-00002"]
    folder = parse_source(f"folder:{image_folder}", holdout_fraction=0.3)
    assert report.written["validation"] == folder.num_examples("validation")
    assert report.written["train"] == folder.num_examples("train") - 1  # the broken file
    records = tf.data.TFRecordDataset(report.files["train"] + report.files["validation"])
    keys = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64),
            "image/class/synset": tf.io.FixedLenFeature([], tf.string),
            "image/format": tf.io.FixedLenFeature([], tf.string)}
    synsets = {1: b"ant", 2: b"bee", 3: b"cat"}  # 1-based, sorted folder names
    count = 0
    for record in records:
        example = tf.io.parse_single_example(record, keys)
        assert synsets[int(example["image/class/label"])] == example["image/class/synset"].numpy()
        assert example["image/format"].numpy() == b"JPEG"
        assert example["image/encoded"].numpy()[:2] == b"\xff\xd8"  # PNGs were re-encoded as JPEG
        count += 1
    assert count == 18  # 3 classes x 6 images; the broken file is not among them
    source = parse_source(f"tfrecord:{tmp_path / 'records'}", num_classes=3)
    labels = sorted(int(label) for _, label in source.dataset("validation"))
    assert labels == sorted(entry for _, entry in folder.dataset("validation"))  # same held-out images, 0-based


def corrupt_folder(root, good=6):
    """`good` decodable JPEGs in 2 classes, one file with a bad header and one whose header and end
    marker pass the quick check but whose decode fails."""
    rng = np.random.default_rng(0)
    for i in range(good):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        write_image(root / f"c{i % 2}" / f"{i}.jpg", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    (root / "c0" / "bad_header.jpg").write_bytes(b"not an image at all")
    valid = tf.io.encode_jpeg(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).numpy()
    (root / "c1" / "bad_body.jpg").write_bytes(valid[:200] + b"\x00" * 50 + b"\xff\xd9")
    return root


def test_undecodable_images_are_counted_once_per_file_not_once_per_epoch(tmp_path):
    from advprop_tf.data.pipeline import DecodeStats

    source = parse_source(f"folder:{corrupt_folder(tmp_path / 'images')}")
    assert source.num_examples("train") == 8
    stats = DecodeStats()
    batches = train_dataset(source, 32, 2, seed=1, stats=stats, shuffle_buffer=8)
    labels = [l.numpy() for _, l in batches.take(12)]  # 24 images: four passes over the 6 good ones
    assert len(labels) == 12 and int(stats.skipped.numpy()) == 2
    # a resumed pipeline (no saved iterator) that skips the first pass counts nothing again
    resumed_stats = DecodeStats()
    resumed_stats.skipped.assign(2)
    resumed = train_dataset(source, 32, 2, seed=1, stats=resumed_stats, skip_examples=8, shuffle_buffer=8)
    list(resumed.take(6))
    assert int(resumed_stats.skipped.numpy()) == 2


def encode_with_pil(image, fmt, mode=None):
    import io

    from PIL import Image

    picture = Image.fromarray(image)
    picture = picture.convert(mode) if mode else picture
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    return buffer.getvalue()


def test_every_format_tensorflow_decodes_is_read_and_degenerate_images_are_resized(tmp_path, caplog):
    """PNG, grayscale, CMYK and RGBA, BMP, GIF, WebP, upper-case .JPEG, a 1x1 and a 3000x20 image: all read,
    none dropped or counted corrupt; other files are left out and reported at start."""
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    files = {
        "rgb.png": encode_with_pil(picture, "PNG"), "gray.png": encode_with_pil(picture, "PNG", "L"),
        "rgba.png": encode_with_pil(picture, "PNG", "RGBA"), "cmyk.jpg": encode_with_pil(picture, "JPEG", "CMYK"),
        "photo.JPEG": encode_with_pil(picture, "JPEG"), "bitmap.bmp": encode_with_pil(picture, "BMP"),
        "palette.gif": encode_with_pil(picture, "GIF", "P"), "modern.webp": encode_with_pil(picture, "WEBP"),
        "one_pixel.jpg": encode_with_pil(np.full((1, 1, 3), 200, np.uint8), "JPEG"),
        "strip.png": encode_with_pil(rng.integers(0, 255, (20, 3000, 3), dtype=np.uint8), "PNG"),
    }
    root = tmp_path / "images"
    for name, data in files.items():
        for label in ("a", "b"):
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / label / name).write_bytes(data)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "scan.tiff").write_bytes(b"II*\x00")
    with caplog.at_level("WARNING"):
        source = parse_source(f"folder:{root}")
    assert source.num_examples("train") == 2 * len(files)
    assert "left out 2 entries" in caplog.text and ".tiff 1" in caplog.text and ".txt 1" in caplog.text
    stats = DecodeStats()
    for crop in ("center", "none"):
        images = [x for x, _ in eval_dataset(source, 32, 4, split="train", stats=stats, crop=crop).unbatch()]
        assert len(images) == 2 * len(files) and all(x.shape == (32, 32, 3) for x in images)
    assert int(stats.skipped.numpy()) == 0
    trained = [x for x, _ in train_dataset(source, 32, 4, seed=0, stats=stats).unbatch().take(2 * len(files))]
    assert len(trained) == 2 * len(files) and int(stats.skipped.numpy()) == 0
    one_pixel = preprocess_eval(tf.constant(files["one_pixel.jpg"]), 16).numpy()
    assert np.abs(one_pixel - 200).max() <= 2  # the one pixel, resized, not a crop of nothing


def test_an_already_cropped_image_is_resized_not_cropped_again():
    """Border red, centre blue: the 0.875 center crop removes the border, crop="none" keeps it (ImageNet-C)."""
    image = np.zeros([64, 64, 3], np.uint8)
    image[..., 0] = 255
    image[4:60, 4:60] = (0, 0, 255)
    centre = preprocess_eval(tf.constant(image), 64).numpy()
    whole = preprocess_eval(tf.constant(image), 64, crop="none").numpy()
    np.testing.assert_allclose(whole, image, atol=1e-3)  # same size: resize only is the identity
    assert centre[0, 0, 2] > 200 and centre[0, 0, 0] < 50  # corner is blue after the crop
    assert whole[0, 0, 0] > 200 and whole[0, 0, 2] < 50  # corner keeps its red border
    with pytest.raises(ValueError, match="eval crop must be one of"):
        preprocess_eval(tf.constant(image), 64, crop="corner")


def test_a_tfrecord_glob_is_split_by_shard_names_never_used_as_both_splits(tmp_path):
    examples = [(gradient_image(16, 16, i), 1 + i % 4) for i in range(8)]
    write_tfrecords(tmp_path / "r", "train", examples, shards=2)
    write_tfrecords(tmp_path / "r", "validation", examples[:4], shards=1)
    source = parse_source(f"tfrecord:{tmp_path / 'r'}/*", num_classes=4)
    assert source.splits == ("train", "validation")
    assert sum(1 for _ in source.dataset("train")) == 8 and sum(1 for _ in source.dataset("validation")) == 4
    only_train = parse_source(f"tfrecord:{tmp_path / 'r'}/train-*", num_classes=4)
    assert only_train.splits == ("train",)  # no validation split made of training shards
    braces = parse_source(f"tfrecord:{tmp_path / 'r'}/{{split}}-*", num_classes=4)
    assert sum(1 for _ in braces.dataset("validation")) == 4
    (tmp_path / "r" / "part-0.tfrecord").write_bytes(b"")
    with pytest.raises(SourceError, match=r"neither train-\* nor validation-\* \(e.g. 'part-0.tfrecord'\).*\{split\}"):
        parse_source(f"tfrecord:{tmp_path / 'r'}/*", num_classes=4)


def test_each_input_pipeline_draws_its_own_augmentation_and_resumes_its_own_stream(tmp_path):
    """Workers (TPU hosts) with the same seed: the n-th image of each gets its own crop, flip and RandAugment draw;
    a pipeline's stream continues exactly after its iterator is restored."""
    picture = gradient_image(64, 64, seed=3)
    root = tmp_path / "same"
    (root / "only").mkdir(parents=True)
    for i in range(8):  # every file the same picture: any difference comes from the seeds
        write_image(root / "only" / f"{i}.png", picture, fmt="png")
    source = parse_source(f"folder:{root}")

    def pipeline(index):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index, num_replicas_in_sync=2)
        return train_dataset(source, 32, 2, augment="randaugment", seed=11, input_context=ctx)

    first, second = (next(iter(pipeline(i)))[0].numpy() for i in (0, 1))
    assert all(not np.array_equal(first[k], second[k]) for k in range(2))
    np.testing.assert_array_equal(first, next(iter(pipeline(0)))[0].numpy())  # and each is deterministic

    stream = iter(pipeline(1))
    [next(stream) for _ in range(3)]
    checkpoint = tf.train.Checkpoint(iterator=stream)
    path = checkpoint.write(str(tmp_path / "iterator"))
    expected = [next(stream)[0].numpy() for _ in range(3)]
    resumed = iter(pipeline(1))
    tf.train.Checkpoint(iterator=resumed).read(path).assert_consumed()
    for want in expected:
        np.testing.assert_array_equal(next(resumed)[0].numpy(), want)
