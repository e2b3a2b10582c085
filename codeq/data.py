"""Datasets (CIFAR-10/100, Fashion-MNIST, synthetic) held as uint8 tensors, and their batch pipelines.

A whole split lives in memory (or on the accelerator) as one ``uint8`` tensor ``N x C x H x W``;
training batches are shuffled and augmented with batched tensor ops (random crop from a
zero-padded image + horizontal flip), then normalised ``x = (u8 / 255 - mean) / std``. Every random
draw of an epoch comes from a ``torch.Generator`` seeded from ``(seed, epoch)``, so epoch ``k`` yields
the same batches whether or not the run was resumed there. ``loader=torch`` gives the classic
``DataLoader`` + torchvision transforms path instead.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, default_collate

from codeq.errors import ConfigError, DatasetNotFoundError
from codeq.safepickle import load_data_pickle
from codeq.schema import allowed, configured_by

log = logging.getLogger(__name__)

LOADERS = ("auto", "memory", "device", "torch")
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# torchvision's file layouts (folder, train files, test files), spelled out so reading needs no torchvision
# import (seconds); its dataset classes are imported only to download.
CIFAR_LAYOUT = {
    "CIFAR10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",)),
    "CIFAR100": ("cifar-100-python", ("train",), ("test",)),
}
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Per-channel (mean, std) of the training images in [0, 1]. CIFAR-10's are the widely used kuangliu
# constants; CIFAR-100's and Fashion-MNIST's are the datasets' statistics.
CIFAR10_NORMALIZATION = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CIFAR100_NORMALIZATION = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
FASHION_MNIST_NORMALIZATION = ((0.2860,), (0.3530,))

# Independent random streams derived from the seed: epoch order/augmentation, synthetic images.
_STREAM_EPOCH = 0
_STREAM_SYNTHETIC = 1


@dataclass(frozen=True)
class Split:
    """One split of a dataset: ``images`` uint8 ``N x C x H x W`` and ``labels`` int64 ``N``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation: crop ``H x W`` from the image zero-padded by ``padding``; flip with p=1/2."""

    padding: int
    flip: bool


def derived_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for the random stream ``key`` of ``seed`` (numpy's SeedSequence mixing)."""
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seeded_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the random stream ``key`` of ``seed``; the global RNG stays untouched."""
    return torch.Generator().manual_seed(derived_seed(seed, *key))


def crop_and_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Batched random-crop + horizontal flip of ``images`` (``B x C x H x W``, any dtype).

    Output image ``b`` is the ``H x W`` window at ``(top[b], left[b])`` (each in ``[0, 2*padding]``) of
    the image zero-padded by ``padding`` on every side, mirrored left-right where ``flip[b]``: the same
    as torchvision's ``RandomCrop(size, padding)`` followed by ``RandomHorizontalFlip``. Rows are
    picked whole with one ``index_select``, columns with one ``gather``; no per-image Python loop.
    """
    n, c, h, w = images.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(images, (padding, padding, padding, padding)).view(n * c * hp, wp)
    arange = torch.arange(max(h, w, n * c), device=images.device)
    rows = (arange[: n * c] * hp).view(n, c, 1) + top.view(n, 1, 1) + arange[:h]
    cropped_rows = padded.index_select(0, rows.view(-1)).view(n, c, h, wp)
    columns = torch.where(flip.view(n, 1), w - 1 - arange[:w], arange[:w]) + left.view(n, 1)
    return cropped_rows.gather(3, columns.view(n, 1, 1, w).expand(n, c, h, w))


def rank_slice(size: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s part of a global batch of ``size``: contiguous, disjoint, sizes differing by at most one,
    together exactly the batch (``[rank·size // W, (rank+1)·size // W)``)."""
    return slice(rank * size // world_size, (rank + 1) * size // world_size)


def _check_shard(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank!r} of {world_size!r}")


class _TensorBatches:
    """Sized iterable of ``(x, y)`` batches of a split held as tensors; random draws happen in ``__iter__``.

    With ``world_size`` > 1 each global batch of ``batch_size`` is cut by ``rank_slice`` and only this rank's
    part is gathered and augmented: every rank yields the same number of batches, in the same global order.
    """

    def __init__(self, data: DataModule, split: Split, epoch: int | None, rank: int = 0, world_size: int = 1):
        self._data = data
        self._split = split
        self._epoch = epoch
        self._rank = rank
        self._world_size = world_size

    def __len__(self) -> int:
        return math.ceil(len(self._split) / self._data.batch_size)

    def _parts(self, n: int):
        """(start, stop) of this rank's part of each global batch."""
        size = self._data.batch_size
        for start in range(0, n, size):
            part = rank_slice(min(size, n - start), self._rank, self._world_size)
            yield start + part.start, start + part.stop

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data, split = self._data, self._split
        on_cpu = split.images.device.type == "cpu"
        if self._epoch is None:
            for start, stop in self._parts(len(split)):
                with _one_cpu_thread(on_cpu):
                    batch = data._to_batch(split.images[start:stop], split.labels[start:stop])
                yield batch
            return
        generator = seeded_generator(data.seed, _STREAM_EPOCH, self._epoch)
        n, aug = len(split), data.augmentation
        storage = split.images.device
        order = torch.randperm(n, generator=generator).to(storage)
        if aug is not None:
            top = torch.randint(0, 2 * aug.padding + 1, (n,), generator=generator).to(storage)
            left = torch.randint(0, 2 * aug.padding + 1, (n,), generator=generator).to(storage)
            flip = torch.rand(n, generator=generator) < 0.5
            flip = (flip if aug.flip else torch.zeros_like(flip)).to(storage)
        for start, stop in self._parts(n):
            with _one_cpu_thread(on_cpu):
                index = order[start:stop]
                images = split.images.index_select(0, index)
                if aug is not None:
                    window = slice(start, stop)
                    images = crop_and_flip(images, top[window], left[window], flip[window], aug.padding)
                batch = data._to_batch(images, split.labels.index_select(0, index))
            yield batch


@contextmanager
def _one_cpu_thread(active: bool):
    """Run a batch's CPU ops on one intra-op thread, restoring the setting before the batch is used.

    The ops are small and memory-bound: OpenMP fork/join per op costs more than it saves, and
    when the cores are shared each parallel region can wait a scheduler slice (measured ~6x slower
    with 2 threads than with 1 on the 2-core dev machine under load).
    """
    threads = torch.get_num_threads()
    if active and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if active and threads > 1:
            torch.set_num_threads(threads)


class _TransformedTensors(Dataset):
    """Map-style dataset over uint8 tensors with torchvision transforms, for ``loader=torch``.

    The transforms of sample ``i`` draw from the global CPU RNG reseeded to ``base_seed + i`` inside
    ``fork_rng`` (restored afterwards), so they depend only on (seed, epoch, i), also in workers.
    """

    def __init__(self, split: Split, transform, base_seed: int):
        self.split = split
        self.transform = transform
        self.base_seed = base_seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed((self.base_seed + i) % 2**63)
            return self.transform(self.split.images[i]), self.split.labels[i]


def _collate(input_size: tuple[int, ...], samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """default_collate, and for a rank's empty part of a small last batch an empty batch of the right shape."""
    if not samples:
        return torch.empty(0, *input_size), torch.empty(0, dtype=torch.int64)
    return default_collate(samples)


class _RankBatches:
    """This rank's ``rank_slice`` of each index batch of ``batches`` (a batch sampler), drawn lazily."""

    def __init__(self, batches, rank: int, world_size: int):
        self._batches = batches
        self._rank = rank
        self._world_size = world_size

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches:
            yield batch[rank_slice(len(batch), self._rank, self._world_size)]


class _TorchLoaderBatches:
    """Sized iterable over a torch ``DataLoader``, moving each batch to the device."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self._loader = loader
        self._device = device

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._loader:
            yield x.to(self._device, non_blocking=True), y.to(self._device, non_blocking=True)


class DataModule:
    """A dataset's train and test splits and their batch pipelines.

    ``train_batches(epoch)`` is shuffled and augmented, a pure function of ``(seed, epoch)``;
    ``test_batches()`` is unaugmented in a fixed order. Batches are ``x`` float32 normalised and
    ``y`` int64, both on ``device``. ``loader``: ``memory`` (split in RAM, batched CPU augmentation,
    pinned non-blocking copies to a CUDA device), ``device`` (split resident on ``device``, augmentation
    there), ``torch`` (``DataLoader`` with ``num_workers`` and torchvision transforms), or ``auto``
    (``device`` on CUDA, else ``memory``).
    """

    def __init__(
        self,
        *,
        name: str,
        train: Split,
        test: Split,
        num_classes: int,
        normalization: tuple[Sequence[float], Sequence[float]],
        augmentation: Augmentation | None,
        batch_size: int,
        num_workers: int = 0,
        loader: str = "auto",
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        _check_choice("loader", loader, LOADERS)
        self.name = name
        self.device = torch.device(device)
        self.loader = ("device" if self.device.type == "cuda" else "memory") if loader == "auto" else loader
        self.input_size = tuple(train.images.shape[1:])
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.augmentation = augmentation
        self.mean, self.std = (tuple(float(v) for v in values) for values in normalization)
        self.num_train, self.num_test = len(train), len(test)
        _check_split(name, "train", train, self.input_size, num_classes)
        _check_split(name, "test", test, self.input_size, num_classes)
        storage = self.device if self.loader == "device" else torch.device("cpu")
        self._train = Split(train.images.to(storage), train.labels.to(storage))
        self._test = Split(test.images.to(storage), test.labels.to(storage))
        mean = torch.tensor(self.mean, device=self.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(-1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std
        log.info(
            "%s: %d train / %d test images of %s, %d classes, loader=%s on %s",
            name,
            self.num_train,
            self.num_test,
            "x".join(map(str, self.input_size)),
            num_classes,
            self.loader,
            self.device,
        )

    @property
    def num_train_batches(self) -> int:
        return math.ceil(self.num_train / self.batch_size)

    @property
    def num_test_batches(self) -> int:
        return math.ceil(self.num_test / self.batch_size)

    def train_batches(self, epoch: int, rank: int = 0, world_size: int = 1):
        """The shuffled, augmented batches of ``epoch``: the same for the same ``(seed, epoch)``.

        Data-parallel: rank ``rank`` of ``world_size`` gets its ``rank_slice`` of every global batch of
        ``batch_size``; the ranks' parts are disjoint and together exactly the single-process batches.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        _check_shard(rank, world_size)
        if self.loader == "torch":
            return self._torch_batches(self._train, epoch, rank, world_size)
        return _TensorBatches(self, self._train, epoch, rank, world_size)

    def test_batches(self, rank: int = 0, world_size: int = 1):
        """The test split in its stored order, unaugmented (this rank's part of each batch, as above)."""
        _check_shard(rank, world_size)
        if self.loader == "torch":
            return self._torch_batches(self._test, None, rank, world_size)
        return _TensorBatches(self, self._test, None, rank, world_size)

    def _to_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images -> normalised float32 on the device; labels -> int64 on the device."""
        if images.device != self.device:
            if self.device.type == "cuda":
                images, labels = images.pin_memory(), labels.pin_memory()
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        return images.float().mul_(self._scale).add_(self._shift), labels

    def _torch_batches(self, split: Split, epoch: int | None, rank: int, world_size: int) -> _TorchLoaderBatches:
        from torchvision.transforms import v2

        steps = []
        if epoch is not None and self.augmentation is not None:
            steps.append(v2.RandomCrop(self.input_size[1:], padding=self.augmentation.padding))
            if self.augmentation.flip:
                steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        base_seed = derived_seed(self.seed, _STREAM_EPOCH, epoch) if epoch is not None else 0
        dataset = _TransformedTensors(split, v2.Compose(steps), base_seed)
        generator = seeded_generator(self.seed, _STREAM_EPOCH, epoch) if epoch is not None else None
        order = RandomSampler(dataset, generator=generator) if epoch is not None else SequentialSampler(dataset)
        batches = _RankBatches(BatchSampler(order, self.batch_size, drop_last=False), rank, world_size)
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=partial(_collate, self.input_size),
            pin_memory=self.device.type == "cuda",
        )
        return _TorchLoaderBatches(loader, self.device)


# ----------------------------------------------------------------------------------- validation


@dataclass
class DatasetKeys:
    """The keys every dataset option has (conf/dataset/*.yaml)."""

    name: str = MISSING
    input_size: list[int] = allowed(minimum=1, length=3)
    num_classes: int = allowed(minimum=1)
    root: str = MISSING
    download: bool = False
    batch_size: int = allowed(minimum=1)
    num_workers: int = allowed(minimum=0)
    loader: str = allowed(default="auto", choices=LOADERS)
    augment: bool = True
    seed: int = allowed(minimum=0)


@dataclass
class SyntheticKeys(DatasetKeys):
    train_size: int = allowed(minimum=1)
    test_size: int = allowed(minimum=1)


def _check_int(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"dataset.{key} must be an integer >= {minimum}, got {value!r}")


def _check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"dataset.{key} must be true or false, got {value!r}")


def _check_choice(key: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"dataset.{key} must be one of {', '.join(allowed)}; got {value!r}")


def _check_input_size(input_size) -> tuple[int, int, int]:
    values = list(input_size) if isinstance(input_size, Sequence) and not isinstance(input_size, str) else None
    if (
        values is None
        or len(values) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)
    ):
        raise ConfigError(f"dataset.input_size must be [C, H, W], three integers >= 1, got {input_size!r}")
    return tuple(values)


def _check_fixed_shape(name: str, input_size, num_classes, expected_size: tuple, expected_classes: int) -> None:
    """The YAML states a real dataset's shape for interpolation; it must be the data's."""
    if _check_input_size(input_size) != expected_size:
        raise ConfigError(
            f"dataset.input_size must be {list(expected_size)} for {name} (fixed by the data), got {list(input_size)}"
        )
    if num_classes != expected_classes:
        raise ConfigError(
            f"dataset.num_classes must be {expected_classes} for {name} (fixed by the data), got {num_classes!r}"
        )


def _check_common(batch_size, num_workers, loader, augment, download, seed) -> None:
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    _check_choice("loader", loader, LOADERS)
    _check_bool("augment", augment)
    _check_bool("download", download)
    _check_int("seed", seed, 0)


def _check_split(name: str, which: str, split: Split, input_size: tuple, num_classes: int) -> None:
    images, labels = split.images, split.labels
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != input_size or labels.dtype != torch.int64:
        raise ValueError(
            f"{name} {which}: expected uint8 images N x {'x'.join(map(str, input_size))} and int64 "
            f"labels, got {images.dtype} {tuple(images.shape)} and {labels.dtype}"
        )
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{name} {which}: {images.shape[0]} images but {labels.numel()} labels")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        raise ValueError(f"{name} {which}: labels outside [0, {num_classes})")


# -------------------------------------------------------------------------------------- CIFAR


def _read_cifar_batches(paths: Sequence[Path]) -> Split:
    """Concatenate CIFAR python-pickle batch files: dicts with ``data`` (N x 3072 uint8) and labels."""
    images, labels = [], []
    for path in paths:
        batch = load_data_pickle(path)
        if not isinstance(batch, dict):
            raise ConfigError(f"{path} is not a CIFAR batch (a pickled dict); check dataset.root")
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64))
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _load_cifar(class_name: str, title: str, root, download: bool) -> tuple[Split, Split]:
    """Read torchvision's CIFAR file layout under ``root`` ourselves (torchvision's classes md5-check
    every file on load, which fake test files fail); torchvision's class is used only to download,
    when allowed and files are missing."""
    root = Path(root).expanduser()
    base_folder, train_names, test_names = CIFAR_LAYOUT[class_name]
    folder = root / base_folder
    train_files = [folder / name for name in train_names]
    test_files = [folder / name for name in test_names]
    missing = [p.name for p in train_files + test_files if not p.is_file()]
    if missing and download:
        import torchvision.datasets

        log.info("downloading %s into %s", title, root)
        try:
            getattr(torchvision.datasets, class_name)(str(root), train=False, download=True)
        except (OSError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DatasetNotFoundError(f"{title}: downloading into dataset.root={root} failed ({reason})") from err
    elif missing:
        raise DatasetNotFoundError(
            f"{title} not found: dataset.root={root} has no {base_folder}/{missing[0]}; "
            f"set dataset.download=true to download it, or dataset.root to a folder that has it"
        )
    return _read_cifar_batches(train_files), _read_cifar_batches(test_files)


def _cifar(
    class_name: str,
    title: str,
    classes: int,
    normalization,
    *,
    name,
    input_size,
    num_classes,
    root,
    download,
    batch_size,
    num_workers,
    loader,
    augment,
    seed,
    device,
) -> DataModule:
    """CIFAR-10 or CIFAR-100: validated arguments, the splits from ``root``, crop (4 px) + flip augmentation."""
    _check_common(batch_size, num_workers, loader, augment, download, seed)
    _check_fixed_shape(name, input_size, num_classes, (3, 32, 32), classes)
    train, test = _load_cifar(class_name, title, root, download)
    return DataModule(
        name=name,
        train=train,
        test=test,
        num_classes=classes,
        normalization=normalization,
        augmentation=Augmentation(4, True) if augment else None,
        batch_size=batch_size,
        num_workers=num_workers,
        loader=loader,
        seed=seed,
        device=device,
    )


@configured_by(DatasetKeys)
def cifar10(
    *,
    name: str = "cifar10",
    input_size=(3, 32, 32),
    num_classes: int = 10,
    root="data",
    download: bool = False,
    batch_size: int = 512,
    num_workers: int = 2,
    loader: str = "auto",
    augment: bool = True,
    seed: int = 0,
    device="cpu",
) -> DataModule:
    """CIFAR-10 (50,000 / 10,000 images 3x32x32, 10 classes) from ``root/cifar-10-batches-py``."""
    return _cifar(
        "CIFAR10",
        "CIFAR-10",
        10,
        CIFAR10_NORMALIZATION,
        name=name,
        input_size=input_size,
        num_classes=num_classes,
        root=root,
        download=download,
        batch_size=batch_size,
        num_workers=num_workers,
        loader=loader,
        augment=augment,
        seed=seed,
        device=device,
    )


@configured_by(DatasetKeys)
def cifar100(
    *,
    name: str = "cifar100",
    input_size=(3, 32, 32),
    num_classes: int = 100,
    root="data",
    download: bool = False,
    batch_size: int = 512,
    num_workers: int = 2,
    loader: str = "auto",
    augment: bool = True,
    seed: int = 0,
    device="cpu",
) -> DataModule:
    """CIFAR-100 (50,000 / 10,000 images 3x32x32, 100 fine classes) from ``root/cifar-100-python``."""
    return _cifar(
        "CIFAR100",
        "CIFAR-100",
        100,
        CIFAR100_NORMALIZATION,
        name=name,
        input_size=input_size,
        num_classes=num_classes,
        root=root,
        download=download,
        batch_size=batch_size,
        num_workers=num_workers,
        loader=loader,
        augment=augment,
        seed=seed,
        device=device,
    )


# ------------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> torch.Tensor:
    """An idx file of unsigned bytes (optionally ``.gz``) as a uint8 tensor of the shape in its header."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0:3] != b"\x00\x00\x08":
        raise DatasetNotFoundError(f"dataset.root: {path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(raw) != offset + math.prod(shape):
        raise DatasetNotFoundError(f"dataset.root: {path} holds {len(raw) - offset} bytes, its header says {shape}")
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8).view(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _fashion_mnist_dir(candidates: Sequence[Path]) -> Path | None:
    """The first folder holding all four Fashion-MNIST idx files (plain or .gz)."""
    stems = [stem for pair in FASHION_MNIST_FILES.values() for stem in pair]
    return next((d for d in candidates if all(_find_idx(d, s) for s in stems)), None)


def _load_fashion_mnist(root, download: bool) -> tuple[Split, Split]:
    """From ``root/FashionMNIST/raw``, else Debian's package folder, else torchvision's download."""
    root = Path(root).expanduser()
    raw = root / "FashionMNIST" / "raw"
    folder = _fashion_mnist_dir([raw, DEBIAN_FASHION_MNIST_DIR])
    if folder is None and download:
        from torchvision.datasets import FashionMNIST

        log.info("downloading Fashion-MNIST into %s", root)
        try:
            FashionMNIST(str(root), train=False, download=True)
        except (OSError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DatasetNotFoundError(
                f"Fashion-MNIST: downloading into dataset.root={root} failed ({reason})"
            ) from err
        folder = raw
    elif folder is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in dataset.root={root} (FashionMNIST/raw/*-ubyte[.gz]) nor in "
            f"{DEBIAN_FASHION_MNIST_DIR}: `apt-get install dataset-fashion-mnist` or set dataset.download=true"
        )
    log.info("reading Fashion-MNIST from %s", folder)
    splits = []
    for images_stem, labels_stem in FASHION_MNIST_FILES.values():
        images = read_idx(_find_idx(folder, images_stem)).unsqueeze(1)
        splits.append(Split(images, read_idx(_find_idx(folder, labels_stem)).long()))
    return splits[0], splits[1]


@configured_by(DatasetKeys)
def fashion_mnist(
    *,
    name: str = "fashion_mnist",
    input_size=(1, 28, 28),
    num_classes: int = 10,
    root="data",
    download: bool = False,
    batch_size: int = 128,
    num_workers: int = 2,
    loader: str = "auto",
    augment: bool = True,
    seed: int = 0,
    device="cpu",
) -> DataModule:
    """Fashion-MNIST (60,000 / 10,000 images 1x28x28, 10 classes); augmentation: crop with 2-pixel
    padding + horizontal flip (the garments are centred and left-right symmetric)."""
    _check_common(batch_size, num_workers, loader, augment, download, seed)
    _check_fixed_shape(name, input_size, num_classes, (1, 28, 28), 10)
    train, test = _load_fashion_mnist(root, download)
    return DataModule(
        name=name,
        train=train,
        test=test,
        num_classes=10,
        normalization=FASHION_MNIST_NORMALIZATION,
        augmentation=Augmentation(2, True) if augment else None,
        batch_size=batch_size,
        num_workers=num_workers,
        loader=loader,
        seed=seed,
        device=device,
    )


# ----------------------------------------------------------------------------------- synthetic


def synthetic_splits(
    input_size: tuple[int, int, int], num_classes: int, train_size: int, test_size: int, seed: int
) -> tuple[Split, Split]:
    """Learnable random images: class ``k`` is a smooth random template ``T_k`` plus pixel noise,
    ``x = clip(200 T_k + 28 + 30 n, 0, 255)`` with ``T_k`` a 4x4 uniform grid upsampled bilinearly
    and ``n ~ N(0, 1)``; labels are balanced. A pure function of its arguments."""
    c, h, w = input_size
    generator = seeded_generator(seed, _STREAM_SYNTHETIC)
    grid = torch.rand(num_classes, c, 4, 4, generator=generator)
    templates = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    splits = []
    for size in (train_size, test_size):
        labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=generator)]
        noise = torch.randn(size, c, h, w, generator=generator)
        images = (200 * templates[labels] + 28 + 30 * noise).round_().clamp_(0, 255).to(torch.uint8)
        splits.append(Split(images, labels))
    return splits[0], splits[1]


@configured_by(SyntheticKeys)
def synthetic(
    *,
    name: str = "synthetic",
    input_size=(3, 32, 32),
    num_classes: int = 10,
    train_size: int = 512,
    test_size: int = 256,
    root="data",
    download: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    loader: str = "auto",
    augment: bool = True,
    seed: int = 0,
    device="cpu",
) -> DataModule:
    """Synthetic class-template images of any ``input_size`` (``root``/``download`` unused: nothing to read).
    Augmentation as for CIFAR: crop with ``min(H, W) // 8`` pixels of padding (4 at 32x32) + flip;
    normalised with the per-channel statistics of (up to 4096 of) its training images."""
    _check_common(batch_size, num_workers, loader, augment, download, seed)
    size = _check_input_size(input_size)
    _check_int("num_classes", num_classes, 1)
    _check_int("train_size", train_size, 1)
    _check_int("test_size", test_size, 1)
    train, test = synthetic_splits(size, num_classes, train_size, test_size, seed)
    sample = train.images[:4096].double().div_(255)
    normalization = (sample.mean(dim=(0, 2, 3)).tolist(), sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return DataModule(
        name=name,
        train=train,
        test=test,
        num_classes=num_classes,
        normalization=normalization,
        augmentation=Augmentation(min(size[1:]) // 8, True) if augment else None,
        batch_size=batch_size,
        num_workers=num_workers,
        loader=loader,
        seed=seed,
        device=device,
    )
