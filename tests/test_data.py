"""The data layer: batch shapes, (seed, epoch) determinism, augmentation, file formats, error messages."""

import gzip
import pickle
import struct
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from codeq import data
from codeq.data import Augmentation, DataModule, Split, crop_and_flip
from codeq.errors import ConfigError, DatasetNotFoundError

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


def batches(iterable):
    return [(x.clone(), y.clone()) for x, y in iterable]


def tiny_module(images, labels, augmentation, batch_size=1, loader="memory", **kwargs):
    """Unit normalisation (mean 0, std 1/255): batches hold the raw pixel values as floats."""
    split = Split(images, labels)
    return DataModule(
        name="tiny",
        train=split,
        test=split,
        num_classes=int(labels.max()) + 1,
        normalization=((0.0,) * images.shape[1], (1 / 255,) * images.shape[1]),
        augmentation=augmentation,
        batch_size=batch_size,
        loader=loader,
        **kwargs,
    )


# ------------------------------------------------------------------------------------- batches


def test_synthetic_module_attributes_and_batch_shapes():
    dm = data.synthetic(input_size=[3, 16, 12], num_classes=4, train_size=70, test_size=30, batch_size=32)
    assert (dm.name, dm.input_size, dm.num_classes, dm.batch_size) == ("synthetic", (3, 16, 12), 4, 32)
    assert (dm.num_train, dm.num_test, dm.device, dm.loader) == (70, 30, torch.device("cpu"), "memory")
    train = batches(dm.train_batches(0))
    assert len(dm.train_batches(0)) == dm.num_train_batches == len(train) == 3
    assert [len(y) for _, y in train] == [32, 32, 6]
    assert [len(y) for _, y in dm.test_batches()] == [30] and dm.num_test_batches == 1
    for x, y in train:
        assert x.shape[1:] == (3, 16, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.device == y.device == torch.device("cpu")
    labels = torch.cat([y for _, y in train])
    assert sorted(labels.tolist()) == sorted([i % 4 for i in range(70)])  # every image once per epoch


def test_train_batches_depend_only_on_seed_and_epoch():
    def make(seed):
        return data.synthetic(train_size=40, test_size=8, batch_size=16, seed=seed)

    state = torch.random.get_rng_state()
    first, again = batches(make(3).train_batches(5)), batches(make(3).train_batches(5))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not used
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    dm = make(3)
    batches(dm.train_batches(0))  # earlier epochs of an uninterrupted run change nothing
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, batches(dm.train_batches(5))))
    other_epoch = batches(dm.train_batches(6))
    assert not torch.equal(first[0][0], other_epoch[0][0])
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other_epoch]))
    assert not torch.equal(next(iter(make(4).train_batches(5)))[0], first[0][0])


def test_batches_are_built_on_one_thread_and_the_setting_is_restored_between_them(monkeypatch):
    building = []

    def recording_crop_and_flip(*args, **kwargs):
        building.append(torch.get_num_threads())
        return crop_and_flip(*args, **kwargs)

    monkeypatch.setattr(data, "crop_and_flip", recording_crop_and_flip)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dm = data.synthetic(train_size=20, test_size=10, batch_size=8)
        using = [torch.get_num_threads() for _ in dm.train_batches(0)] + [
            torch.get_num_threads() for _ in dm.test_batches()
        ]
        assert building == [1] * 3 and using == [2] * 5 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_bad_epoch_is_rejected():
    dm = data.synthetic(train_size=4, test_size=4)
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        dm.train_batches(-1)


# -------------------------------------------------------------------------------- augmentation


def test_crop_and_flip_on_a_hand_made_image():
    image = torch.tensor([[[1, 2, 3], [4, 5, 6], [7, 8, 9]]], dtype=torch.uint8).view(1, 1, 3, 3)
    images = image.expand(4, 1, 3, 3)
    top, left = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 2])
    flip = torch.tensor([False, False, True, True])
    out = crop_and_flip(images, top, left, flip, padding=1)
    expected = torch.tensor(
        [
            [[0, 0, 0], [0, 1, 2], [0, 4, 5]],  # window at (0, 0) of the zero-padded image
            [[1, 2, 3], [4, 5, 6], [7, 8, 9]],  # (1, 1): the image itself
            [[0, 6, 5], [0, 9, 8], [0, 0, 0]],  # (2, 2) = [[5, 6, 0], [8, 9, 0], [0, 0, 0]], mirrored
            [[0, 0, 0], [0, 3, 2], [0, 6, 5]],  # (0, 2) = [[0, 0, 0], [2, 3, 0], [5, 6, 0]], mirrored
        ],
        dtype=torch.uint8,
    )
    assert torch.equal(out[:, 0], expected)


def test_crop_and_flip_matches_pad_slice_flip_for_every_offset():
    images = torch.randint(0, 256, (18, 2, 5, 7), dtype=torch.uint8)
    top = torch.arange(18) % 3
    left = torch.arange(18) // 3 % 3
    flip = torch.arange(18) >= 9
    out = crop_and_flip(images, top, left, flip, padding=1)
    padded = F.pad(images, (1, 1, 1, 1))
    for b in range(18):
        window = padded[b, :, top[b] : top[b] + 5, left[b] : left[b] + 7]
        assert torch.equal(out[b], window.flip(2) if flip[b] else window)


def test_training_batches_are_cropped_and_flipped_and_test_batches_are_not():
    image = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    dm = tiny_module(image, torch.tensor([0]), Augmentation(padding=1, flip=True))
    padded = F.pad(image[0, 0], (1, 1, 1, 1))
    candidates = {
        (t, c, f): (padded[t : t + 4, c : c + 4].flip(1) if f else padded[t : t + 4, c : c + 4])
        for t in range(3)
        for c in range(3)
        for f in (False, True)
    }
    seen = set()
    for epoch in range(60):
        ((x, _),) = batches(dm.train_batches(epoch))
        pixels = x[0, 0].round().to(torch.uint8)
        matches = [k for k, c in candidates.items() if torch.equal(c, pixels)]
        assert matches, f"epoch {epoch}: not a crop/flip of the image"
        seen.update(matches)
    assert {f for _, _, f in seen} == {False, True}
    assert len({(t, c) for t, c, _ in seen}) >= 6
    ((x, y),) = batches(dm.test_batches())
    assert torch.equal(x.round().to(torch.uint8), image) and y.tolist() == [0]


def test_no_augmentation_still_shuffles():
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 1, 3, 3).contiguous()
    dm = tiny_module(images, torch.arange(8) % 2, None, batch_size=8)
    ((x, y),) = batches(dm.train_batches(0))
    order = x[:, 0, 0, 0].round().long()
    assert sorted(order.tolist()) == list(range(8)) and order.tolist() != list(range(8))
    assert torch.equal(x.round().to(torch.uint8), images[order])  # whole images, uncropped
    assert torch.equal(y, order % 2)


def test_test_batches_are_normalised_in_stored_order():
    dm = data.synthetic(train_size=8, test_size=20, batch_size=8, seed=1)
    train, test = data.synthetic_splits((3, 32, 32), 10, 8, 20, seed=1)
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    expected = (test.images.float() / 255 - mean) / std
    x = torch.cat([x for x, _ in dm.test_batches()])
    y = torch.cat([y for _, y in dm.test_batches()])
    assert torch.allclose(x, expected, atol=1e-5) and torch.equal(y, test.labels)
    sample = train.images.double() / 255
    assert torch.allclose(torch.tensor(dm.mean, dtype=torch.float64), sample.mean(dim=(0, 2, 3)))


def test_device_loader_on_cpu_matches_memory_loader():
    memory = data.synthetic(train_size=50, test_size=10, batch_size=16, loader="memory")
    device = data.synthetic(train_size=50, test_size=10, batch_size=16, loader="device")
    for (x1, y1), (x2, y2) in zip(batches(memory.train_batches(2)), batches(device.train_batches(2)), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loaders_match_the_cpu_batches():
    cpu = data.synthetic(train_size=300, test_size=50, batch_size=64)
    for loader in ("auto", "memory", "device"):
        dm = data.synthetic(train_size=300, test_size=50, batch_size=64, loader=loader, device="cuda")
        assert dm.loader == ("device" if loader == "auto" else loader)
        for (x1, y1), (x2, y2) in zip(batches(cpu.train_batches(1)), batches(dm.train_batches(1)), strict=True):
            assert x2.is_cuda and y2.is_cuda
            assert torch.allclose(x1, x2.cpu(), atol=1e-5) and torch.equal(y1, y2.cpu())


def test_torch_loader_is_deterministic_and_leaves_the_global_rng_alone():
    dm = data.synthetic(train_size=24, test_size=10, batch_size=8, loader="torch", num_workers=0)
    state = torch.random.get_rng_state()
    first, again = batches(dm.train_batches(3)), batches(dm.train_batches(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(dm.train_batches(3)) == len(first) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], batches(dm.train_batches(4))[0][0])
    x, y = first[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    memory = data.synthetic(train_size=24, test_size=10, batch_size=8, loader="memory")
    for (xt, yt), (xm, ym) in zip(batches(dm.test_batches()), batches(memory.test_batches()), strict=True):
        assert torch.allclose(xt, xm, atol=1e-5) and torch.equal(yt, ym)


@pytest.mark.parametrize("loader", ["memory", "torch"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_are_disjoint_and_together_exactly_the_single_process_batches(loader, world_size):
    """50 images in global batches of 16 (the last one 2, fewer than 3 ranks): rank r gets its contiguous part of
    every global batch, the same number of batches on every rank; concatenated over ranks, each batch is the
    single-process one, images (augmented alike) and labels."""
    dm = data.synthetic(train_size=50, test_size=21, batch_size=16, loader=loader, num_workers=0)
    for whole, parts in (
        (dm.train_batches(2), [dm.train_batches(2, r, world_size) for r in range(world_size)]),
        (dm.test_batches(), [dm.test_batches(r, world_size) for r in range(world_size)]),
    ):
        whole, parts = batches(whole), [batches(part) for part in parts]
        assert all(len(part) == len(whole) for part in parts)
        for step, (x, y) in enumerate(whole):
            sizes = [len(part[step][1]) for part in parts]
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(y)
            assert torch.equal(torch.cat([part[step][0] for part in parts]), x)
            assert torch.equal(torch.cat([part[step][1] for part in parts]), y)


def test_rank_slice_splits_a_batch_evenly():
    assert [data.rank_slice(10, r, 4) for r in range(4)] == [slice(0, 2), slice(2, 5), slice(5, 7), slice(7, 10)]
    assert [data.rank_slice(1, r, 2) for r in range(2)] == [slice(0, 0), slice(0, 1)]
    with pytest.raises(ValueError, match="rank must be in"):
        data.synthetic(train_size=8, test_size=8).train_batches(0, rank=2, world_size=2)


def test_synthetic_classes_are_learnable():
    """Nearest class mean of the training images classifies most test images: the labels carry signal."""
    train, test = data.synthetic_splits((3, 32, 32), 10, 512, 256, seed=0)
    means = torch.stack([train.images[train.labels == k].float().mean(0) for k in range(10)])
    distances = torch.cdist(test.images.float().flatten(1), means.flatten(1))
    assert (distances.argmin(1) == test.labels).float().mean() > 0.9
    assert torch.bincount(train.labels).tolist() == [52, 52] + [51] * 8


# ----------------------------------------------------------------------------------- CIFAR files


def write_cifar(root: Path, folder: str, files: dict, label_key: bytes, meta: tuple[str, bytes]):
    """CIFAR python-pickle batches: {b'data': N x 3072 uint8 (R, G, B planes, row-major), label_key: [...]}"""
    (root / folder).mkdir(parents=True)
    for name, (pixels, labels) in files.items():
        entry = {b"batch_label": name.encode(), b"data": pixels, label_key: labels}
        if label_key == b"fine_labels":
            entry[b"coarse_labels"] = [0] * len(labels)
        (root / folder / name).write_bytes(pickle.dumps(entry))
    (root / folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [b"class"]}))


def cifar_pixels(n, start):
    return (np.arange(n * 3072, dtype=np.int64).reshape(n, 3072) + start) % 251


@pytest.mark.parametrize(
    "factory,folder,train_names,test_name,label_key,meta,num_classes",
    [
        (
            data.cifar10,
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            b"labels",
            ("batches.meta", b"label_names"),
            10,
        ),
        (data.cifar100, "cifar-100-python", ["train"], "test", b"fine_labels", ("meta", b"fine_label_names"), 100),
    ],
)
def test_cifar_reads_the_torchvision_file_layout(
    tmp_path, factory, folder, train_names, test_name, label_key, meta, num_classes
):
    files = {
        name: (cifar_pixels(2, 10 * i).astype(np.uint8), [i, num_classes - 1]) for i, name in enumerate(train_names)
    }
    files[test_name] = (cifar_pixels(3, 7).astype(np.uint8), [1, 2, num_classes - 1])
    write_cifar(tmp_path, folder, files, label_key, meta)
    dm = factory(root=str(tmp_path), batch_size=2)
    assert (dm.num_train, dm.num_test, dm.input_size, dm.num_classes) == (
        2 * len(train_names),
        3,
        (3, 32, 32),
        num_classes,
    )
    x = torch.cat([x for x, _ in dm.test_batches()])
    y = torch.cat([y for _, y in dm.test_batches()])
    assert y.tolist() == [1, 2, num_classes - 1]
    mean, std = dm.mean, dm.std
    # image 1, channel G (plane 1), row 2, column 5: byte 3072 + 1024 + 2 * 32 + 5 of the test data
    byte = (3072 + 1024 + 2 * 32 + 5 + 7) % 251
    assert x[1, 1, 2, 5].item() == pytest.approx((byte / 255 - mean[1]) / std[1], abs=1e-5)
    train_labels = sorted(torch.cat([y for _, y in dm.train_batches(0)]).tolist())
    assert train_labels == sorted([i for i in range(len(train_names))] + [num_classes - 1] * len(train_names))


def test_missing_cifar_names_root_and_download(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as error:
        data.cifar10(root=str(root))
    message = str(error.value)
    assert isinstance(error.value, ConfigError) and "\n" not in message
    assert f"dataset.root={root}" in message and "dataset.download=true" in message
    assert "cifar-10-batches-py/data_batch_1" in message


def test_file_layouts_are_torchvisions():
    import torchvision.datasets as tvd

    for name, (folder, train, test) in data.CIFAR_LAYOUT.items():
        cls = getattr(tvd, name)
        assert (cls.base_folder, [f for f, _ in cls.train_list], [f for f, _ in cls.test_list]) == (
            folder,
            list(train),
            list(test),
        )
    expected = [f"{stem}.gz" for pair in data.FASHION_MNIST_FILES.values() for stem in pair]
    assert sorted(f for f, _ in tvd.FashionMNIST.resources) == sorted(expected)


def test_cifar_downloads_through_torchvision_only_when_allowed(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def fake_download(root, train, download):
        calls.append((root, train, download))
        files = {f"data_batch_{i}": (cifar_pixels(1, i).astype(np.uint8), [i]) for i in range(1, 6)}
        files["test_batch"] = (cifar_pixels(1, 0).astype(np.uint8), [0])
        write_cifar(Path(root), "cifar-10-batches-py", files, b"labels", ("batches.meta", b"label_names"))

    monkeypatch.setattr(tvd, "CIFAR10", fake_download)
    with pytest.raises(DatasetNotFoundError):
        data.cifar10(root=str(tmp_path))
    assert calls == []
    dm = data.cifar10(root=str(tmp_path), download=True)
    assert calls == [(str(tmp_path), False, True)] and (dm.num_train, dm.num_test) == (5, 1)
    data.cifar10(root=str(tmp_path), download=True)
    assert len(calls) == 1  # present files are read, not fetched again


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(root, train, download):
        raise OSError("[Errno -3] Temporary failure in name resolution\nmore detail")

    monkeypatch.setattr(tvd, "CIFAR100", offline)
    with pytest.raises(DatasetNotFoundError) as error:
        data.cifar100(root=str(tmp_path), download=True)
    assert str(error.value) == (
        f"CIFAR-100: downloading into dataset.root={tmp_path} failed ([Errno -3] Temporary failure in name resolution)"
    )


# ---------------------------------------------------------------------------- Fashion-MNIST files


def idx_bytes(array: np.ndarray) -> bytes:
    """idx format: 0, 0, type 0x08 (ubyte), ndim, then big-endian uint32 dims and the bytes."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion_mnist(folder: Path, n_train=6, n_test=4, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": (np.arange(n_train * 784) % 256).astype(np.uint8).reshape(n_train, 28, 28),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": (np.arange(n_test * 784) * 3 % 256).astype(np.uint8).reshape(n_test, 28, 28),
        "t10k-labels-idx1-ubyte": np.array([9, 0, 3, 3][:n_test], dtype=np.uint8),
    }
    for name, array in arrays.items():
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / name).write_bytes(idx_bytes(array))
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files_under_root(tmp_path, monkeypatch, compress):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    arrays = write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", compress=compress)
    dm = data.fashion_mnist(root=str(tmp_path), batch_size=4)
    assert (dm.num_train, dm.num_test, dm.input_size, dm.num_classes) == (6, 4, (1, 28, 28), 10)
    ((x, y),) = batches(dm.test_batches())
    assert y.tolist() == [9, 0, 3, 3]
    pixel = arrays["t10k-images-idx3-ubyte"][2, 13, 27]
    assert x[2, 0, 13, 27].item() == pytest.approx((pixel / 255 - 0.2860) / 0.3530, abs=1e-5)


def test_fashion_mnist_falls_back_to_the_debian_folder(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    write_fashion_mnist(debian, n_train=3, n_test=2)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", debian)
    dm = data.fashion_mnist(root=str(tmp_path / "empty"))
    assert (dm.num_train, dm.num_test) == (3, 2)


def test_missing_fashion_mnist_names_root_and_both_remedies(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    with pytest.raises(DatasetNotFoundError) as error:
        data.fashion_mnist(root=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and f"dataset.root={tmp_path}" in message
    assert "apt-get install dataset-fashion-mnist" in message and "dataset.download=true" in message


def test_corrupt_idx_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    raw = tmp_path / "FashionMNIST" / "raw"
    write_fashion_mnist(raw)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(DatasetNotFoundError, match="header says"):
        data.fashion_mnist(root=str(tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    dm = data.fashion_mnist(root=str(tmp_path))
    assert (dm.num_train, dm.num_test, dm.input_size, dm.num_classes) == (60000, 10000, (1, 28, 28), 10)
    labels = torch.cat([y for _, y in dm.test_batches()])
    assert torch.bincount(labels).tolist() == [1000] * 10
    pixels = dm._train.images.double() / 255
    assert pixels.mean().item() == pytest.approx(0.2860, abs=5e-4)
    assert pixels.std().item() == pytest.approx(0.3530, abs=5e-4)


# ------------------------------------------------------------------------------- config and input


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("batch_size", 0, "dataset.batch_size must be an integer >= 1"),
        ("batch_size", 2.5, "dataset.batch_size must be an integer >= 1"),
        ("num_workers", -1, "dataset.num_workers must be an integer >= 0"),
        ("loader", "gpu", "dataset.loader must be one of auto, memory, device, torch"),
        ("augment", "yes", "dataset.augment must be true or false"),
        ("download", 1, "dataset.download must be true or false"),
        ("seed", -3, "dataset.seed must be an integer >= 0"),
        ("train_size", 0, "dataset.train_size must be an integer >= 1"),
        ("test_size", 0, "dataset.test_size must be an integer >= 1"),
        ("num_classes", 0, "dataset.num_classes must be an integer >= 1"),
        ("input_size", [3, 32], "dataset.input_size must be \\[C, H, W\\]"),
        ("input_size", [3, 0, 32], "dataset.input_size must be \\[C, H, W\\]"),
    ],
)
def test_bad_synthetic_arguments_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        data.synthetic(**{key: value})


@pytest.mark.parametrize(
    "factory,kwargs,message",
    [
        (data.cifar10, {"input_size": [1, 28, 28]}, r"dataset.input_size must be \[3, 32, 32\] for cifar10"),
        (data.cifar100, {"num_classes": 10}, "dataset.num_classes must be 100 for cifar100"),
        (data.fashion_mnist, {"input_size": [3, 28, 28]}, r"dataset.input_size must be \[1, 28, 28\]"),
        (data.fashion_mnist, {"batch_size": 0}, "dataset.batch_size must be an integer >= 1"),
        (data.cifar10, {"loader": "fast"}, "dataset.loader must be one of auto, memory, device, torch"),
    ],
)
def test_bad_real_dataset_arguments_fail_before_reading(tmp_path, factory, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        factory(root=str(tmp_path / "nowhere"), **kwargs)


def dataset_config(name: str):
    """The dataset group as Hydra composes it (its shared keys come from conf/dataset/base through defaults)."""
    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        return compose(
            config_name="config", overrides=[f"dataset={name}", "seed=7", "paths.data_dir=/nonexistent/data"]
        )


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "fashion_mnist", "synthetic"])
def test_dataset_configs_have_the_contract_keys(name):
    cfg = dataset_config(name).dataset
    keys = {
        "_target_",
        "name",
        "input_size",
        "num_classes",
        "root",
        "download",
        "batch_size",
        "num_workers",
        "loader",
        "augment",
        "seed",
    } | ({"train_size", "test_size"} if name == "synthetic" else set())
    assert set(cfg.keys()) == keys
    assert (cfg.name, cfg.root, cfg.seed, cfg.download, cfg.loader, cfg.augment) == (
        name,
        "/nonexistent/data",
        7,
        False,
        "auto",
        True,
    )


def test_synthetic_config_instantiates_with_a_device():
    cfg = dataset_config("synthetic")
    dm = hydra.utils.instantiate(cfg.dataset, device=torch.device("cpu"))
    assert (dm.input_size, dm.num_classes, dm.num_train, dm.num_test, dm.seed) == ((3, 32, 32), 10, 512, 256, 7)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_real_dataset_config_without_files_reports_the_root(name):
    """Hydra wraps the factory's error in an InstantiationException; the cause is the one-line message."""
    cfg = dataset_config(name)
    with pytest.raises(Exception) as error:
        hydra.utils.instantiate(cfg.dataset, device=torch.device("cpu"))
    cause = error.value if isinstance(error.value, DatasetNotFoundError) else error.value.__cause__
    assert isinstance(cause, DatasetNotFoundError) and "dataset.root=/nonexistent/data" in str(cause)
