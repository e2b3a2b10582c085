"""The imagefolder/imagenet datasets on generated JPEG trees: layout, pipeline, determinism, one-line layout errors."""

import logging

import pytest
import torch
from image_trees import write_jpeg_tree
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from codeq.errors import DatasetNotFoundError
from codeq.imagefolder import IMAGENET_NORMALIZATION, imagefolder, imagenet, random_resized_crop_box

SMALL = {"image_size": 16, "resize_size": 20, "batch_size": 4, "num_workers": 0}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_jpeg_tree(tmp_path_factory.mktemp("images"), classes=("a", "b", "c"))


def test_classes_and_input_size_come_from_the_data(tree):
    data = imagefolder(root=tree, **SMALL)
    assert data.classes == ["a", "b", "c"] and data.num_classes == 3
    assert data.input_size == (3, 16, 16)
    assert (data.num_train, data.num_test) == (9, 6)
    assert [len(batches) for batches in (data.train_batches(0), data.test_batches())] == [3, 2]
    x, y = next(iter(data.train_batches(0)))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_eval_batches_are_resize_center_crop_normalised(tree):
    data = imagenet(root=tree, **SMALL)
    x, y = next(iter(data.test_batches()))
    reference = v2.Compose(
        [
            v2.Resize(20, antialias=True),
            v2.CenterCrop(16),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(*IMAGENET_NORMALIZATION),
        ]
    )
    first = decode_image(str(tree / "val" / "a" / "0.JPEG"), mode=ImageReadMode.RGB)
    # the pipeline stays uint8 until normalising, the reference goes float after resizing: one grey level apart
    assert torch.allclose(x[0], reference(first), atol=1.01 / 255 / min(IMAGENET_NORMALIZATION[1]))
    assert y.tolist() == [0, 0, 1, 1]


def test_an_epoch_is_a_function_of_seed_and_epoch_also_with_worker_processes(tree):
    data = imagefolder(root=tree, seed=3, **SMALL)
    epoch1 = [(x, y) for x, y in data.train_batches(1)]
    again = imagefolder(root=tree, seed=3, **{**SMALL, "num_workers": 2})
    for (x, y), (x2, y2) in zip(epoch1, again.train_batches(1)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    epoch2 = torch.cat([x for x, _ in data.train_batches(2)])
    assert not torch.equal(torch.cat([x for x, _ in epoch1]), epoch2)
    assert sorted(torch.cat([y for _, y in epoch1]).tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_random_resized_crop_box_covers_8_to_100_percent_with_bounded_ratio():
    generator = torch.Generator().manual_seed(0)
    for height, width in [(40, 48), (300, 200), (7, 9)]:
        for _ in range(200):
            top, left, h, w = random_resized_crop_box(height, width, generator)
            assert 0 <= top <= height - h and 0 <= left <= width - w and h >= 1 and w >= 1
    # an extreme aspect ratio falls back to the central crop clamped to ratio 4/3
    assert random_resized_crop_box(10, 1000, torch.Generator().manual_seed(0))[2:] == (10, 13)


def test_layout_errors_are_one_line(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"has no train/ folder \(expected train/<class>/<image>.JPEG\)"):
        imagefolder(root=tmp_path, **SMALL)
    write_jpeg_tree(tmp_path, classes=("a", "b"))
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="class folder train/empty holds no images"):
        imagefolder(root=tmp_path, **SMALL)
    (tmp_path / "train" / "empty").rmdir()
    (tmp_path / "val" / "zebra").mkdir()
    with pytest.raises(DatasetNotFoundError, match="val/zebra is not a class of train/"):
        imagefolder(root=tmp_path, **SMALL)
    for path in (tmp_path / "val").iterdir():
        for image in path.iterdir():
            image.unlink()
        path.rmdir()
    (tmp_path / "val").rmdir()
    with pytest.raises(DatasetNotFoundError, match="has no val/ folder"):
        imagefolder(root=tmp_path, **SMALL)


def test_files_that_are_not_images_are_skipped_with_one_warning(tmp_path, caplog):
    write_jpeg_tree(tmp_path, classes=("a", "b"))
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "b" / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="codeq.imagefolder"):
        data = imagefolder(root=tmp_path, **SMALL)
    assert data.num_train == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ignored 2 files that are not images" in warnings[0]


def test_rank_shards_together_are_the_single_process_batches(tree):
    data = imagefolder(root=tree, seed=1, **SMALL)
    for batches in (lambda **kw: data.train_batches(4, **kw), lambda **kw: data.test_batches(**kw)):
        whole = list(batches())
        parts = [list(batches(rank=rank, world_size=3)) for rank in range(3)]
        assert [len(p) for p in parts] == [len(whole)] * 3
        for i, (x, y) in enumerate(whole):
            assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
            assert torch.equal(torch.cat([p[i][1] for p in parts]), y)


def test_batched_decode_path_gives_the_worker_paths_batches(tree, monkeypatch):
    """decode=gpu reads bytes in workers and decodes a whole batch in one decode_jpeg call; run here on the CPU."""
    data = imagefolder(root=tree, seed=2, **SMALL)
    expected = [list(data.train_batches(0)), list(data.test_batches())]
    monkeypatch.setattr(data, "decode", "gpu")
    for want, got in zip(expected, [list(data.train_batches(0)), list(data.test_batches())]):
        for (x, y), (x2, y2) in zip(want, got):
            assert torch.equal(x, x2) and torch.equal(y, y2)
