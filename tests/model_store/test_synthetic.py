"""The synthetic shape data set: determinism, ground-truth masks, balance, PNG output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xaiserve.model_store import synthetic
from xaiserve.model_store.synthetic import IMAGE_SIZE, LABELS, make_dataset, make_sample, save_png


def test_sample_types_and_shapes() -> None:
    sample = make_sample(seed=1, index=0)
    assert sample.image.dtype == np.float32 and sample.image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert sample.mask.dtype == bool and sample.mask.shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert sample.label == 0


def test_same_seed_and_index_give_identical_arrays() -> None:
    a, b = make_sample(7, 13), make_sample(7, 13)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.label == b.label


def test_sample_regenerates_alone_as_in_dataset() -> None:
    images, masks, labels = make_dataset(12, seed=3)
    sample = make_sample(3, 9)
    assert np.array_equal(images[9], sample.image)
    assert np.array_equal(masks[9], sample.mask)
    assert labels[9] == sample.label


def test_different_seeds_and_indices_differ() -> None:
    assert not np.array_equal(make_sample(1, 0).image, make_sample(2, 0).image)
    assert not np.array_equal(make_sample(1, 0).image, make_sample(1, 4).image)  # same label


def test_dataset_shapes_balance_and_range() -> None:
    n = 40
    images, masks, labels = make_dataset(n, seed=5)
    assert images.shape == (n, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == np.float32
    assert masks.shape == (n, IMAGE_SIZE, IMAGE_SIZE) and masks.dtype == bool
    assert labels.shape == (n,) and labels.dtype == np.int64
    counts = np.bincount(labels, minlength=len(LABELS))
    assert np.array_equal(counts, [n // len(LABELS)] * len(LABELS))
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_masks_are_neither_empty_nor_whole() -> None:
    _, masks, _ = make_dataset(64, seed=1)
    fractions = masks.mean(axis=(1, 2))
    assert fractions.min() > 0.01 and fractions.max() < 0.5


def test_mask_is_exactly_the_flat_coloured_shape() -> None:
    for index in range(16):
        sample = make_sample(11, index)
        inside = sample.image[:, sample.mask]  # 3 x K
        colour = inside[:, :1]
        assert np.array_equal(inside, np.broadcast_to(colour, inside.shape)), "shape is one colour"
        outside = sample.image[:, ~sample.mask]  # 3 x M
        same = np.all(np.abs(outside - colour) < 1e-6, axis=0)
        assert same.mean() < 0.01, "the shape colour does not leak outside the mask"
        distance = np.linalg.norm(outside.mean(axis=1) - colour[:, 0])
        assert distance > 0.1, "the shape stands out from the background"


def test_shapes_stay_inside_the_image() -> None:
    _, masks, _ = make_dataset(64, seed=2)
    border = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    assert not (masks & border).any()


def test_other_sizes() -> None:
    sample = make_sample(1, 2, size=32)
    assert sample.image.shape == (3, 32, 32) and sample.mask.shape == (32, 32)
    assert sample.mask.any()


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        make_sample(1, -1)
    with pytest.raises(ValueError):
        make_dataset(-1, seed=1)
    with pytest.raises(ValueError):
        save_png(np.zeros((8, 8), dtype=np.float32), "unused.png")


def test_save_png_round_trip(tmp_path: Path) -> None:
    sample = make_sample(1, 1)
    path = tmp_path / "sample.png"
    save_png(sample.image, path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (IMAGE_SIZE, IMAGE_SIZE)
        pixels = np.asarray(im).transpose(2, 0, 1).astype(np.float32) / 255.0
    assert np.abs(pixels - sample.image).max() <= 0.5 / 255.0 + 1e-6


def test_split_seeds_differ() -> None:
    assert synthetic.TRAIN_SEED != synthetic.TEST_SEED


def test_examples_one_per_class(tmp_path):
    written = synthetic.write_examples(tmp_path)
    assert sorted(p.stem for p in written) == sorted(synthetic.LABELS)
    for path in written:
        image = np.asarray(Image.open(path))
        mask = np.asarray(Image.open(path.with_suffix(".mask.png"))) > 0
        assert image.shape == (64, 64, 3) and 0 < mask.mean() < 0.5
