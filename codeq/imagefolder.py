"""Folders of class sub-folders of images (ImageNet's layout, or a researcher's own data) and their batch pipeline.

Layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``; classes are the sorted train folder names,
so ``num_classes`` and the input size (``3 x image_size x image_size``, RGB) come from the data. Training images get
RandomResizedCrop(image_size, scale 0.08-1, ratio 3/4-4/3) + a horizontal flip with p=1/2; evaluation images
Resize(resize_size) of the shorter side + CenterCrop(image_size) (also training ones when ``augment=false``);
both are normalised with ImageNet's mean/std.

Decoding uses ``torchvision.io``. ``decode=cpu``: ``num_workers`` worker processes read, decode, crop and resize
each image (uint8 throughout), the batch is collated into pinned memory and normalised on the device. ``decode=gpu``
(JPEG files only): workers only read the file bytes; the batch is decoded on the GPU by nvjpeg in one call, then
cropped, resized and normalised there. ``auto`` = gpu on CUDA when every file is a JPEG, else cpu. The random
crop/flip of image ``i`` in epoch ``e`` comes from a generator seeded with ``(seed, e, i)`` and the order from
``(seed, e)``, so an epoch's batches are the same on either path and after a resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, default_collate

from codeq.data import (
    _STREAM_EPOCH,
    _check_bool,
    _check_choice,
    _check_int,
    _check_shard,
    _RankBatches,
    derived_seed,
    seeded_generator,
)
from codeq.errors import ConfigError, DatasetNotFoundError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
JPEG_SUFFIXES = (".jpg", ".jpeg")
DECODERS = ("auto", "cpu", "gpu")
IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ImageList:
    """One split: image file paths, their int64 labels, and the class names (index = label)."""

    paths: list[str]
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def scan_split(root: Path, split: str, classes: Sequence[str] | None = None) -> ImageList:
    """The images of ``root/split/<class>/``; ``classes`` (the train split's) fixes the labels of another split.

    A missing split, no class folder, an empty class folder or a class unknown to the train split is one
    DatasetNotFoundError line; files that are not images are skipped with one warning.
    """
    folder = root / split
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"dataset.root={root} has no {split}/ folder (expected {split}/<class>/<image>.JPEG)"
        )
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not found:
        raise DatasetNotFoundError(f"dataset.root={root}: {split}/ has no class folders (expected {split}/<class>/)")
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetNotFoundError(f"dataset.root={root}: {split}/{unknown[0]} is not a class of train/")
    paths, labels, skipped = [], [], []
    for name in found:
        files = sorted(p for p in (folder / name).iterdir() if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped += [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            raise DatasetNotFoundError(
                f"dataset.root={root}: class folder {split}/{name} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        paths += [str(p) for p in images]
        labels += [classes.index(name)] * len(images)
    if skipped:
        log.warning(
            "%s/%s: ignored %d files that are not images (%s), e.g. %s",
            root.name,
            split,
            len(skipped),
            ", ".join(IMAGE_SUFFIXES),
            skipped[0].relative_to(root),
        )
    return ImageList(paths, torch.tensor(labels, dtype=torch.int64), classes)


def random_resized_crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a uniform 8-100 % of the area with log-uniform aspect ratio 3/4-4/3.

    torchvision's RandomResizedCrop rule (10 tries, then the central crop clamped to the ratio range), drawn
    from ``generator``.
    """
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        draws = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * draws[0])
        ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(draws[2] * (height - h + 1)), int(draws[3] * (width - w + 1)), h, w
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_view(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(size) + horizontal flip (p=1/2) of one ``C x H x W`` uint8 image, drawn from ``generator``."""
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], generator)
    view = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    if torch.rand(1, generator=generator).item() < 0.5:
        view = TF.horizontal_flip(view)
    return view


def eval_view(image: torch.Tensor, size: int, resize_size: int) -> torch.Tensor:
    """Resize the shorter side to ``resize_size``, then the central ``size x size`` crop; uint8 in and out."""
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(image, [resize_size], antialias=True), [size, size])


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of image ``index``'s random crop and flip in ``epoch``."""
    return torch.Generator().manual_seed(derived_seed(seed, _STREAM_EPOCH, epoch, index))


class _DecodedImages(Dataset):
    """Map-style dataset of ``(uint8 3 x size x size image, label)``: read, decode, crop/resize (run in workers)."""

    def __init__(self, images: ImageList, size: int, resize_size: int, seed: int, epoch: int | None):
        self.images, self.size, self.resize_size, self.seed, self.epoch = images, size, resize_size, seed, epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_image, read_file

        image = decode_image(read_file(self.images.paths[i]), mode=ImageReadMode.RGB)
        if self.epoch is None:
            return eval_view(image, self.size, self.resize_size), self.images.labels[i]
        return train_view(image, self.size, sample_generator(self.seed, self.epoch, i)), self.images.labels[i]


class _EncodedImages(Dataset):
    """Map-style dataset of ``(index, file bytes, label)``: workers only read; decoding happens on the GPU."""

    def __init__(self, images: ImageList):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        from torchvision.io import read_file

        return i, read_file(self.images.paths[i]), self.images.labels[i]


def _collate_decoded(size: int, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 images and labels; a rank's empty part of a small last batch is an empty batch of the right shape."""
    if not samples:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return default_collate(samples)


def _collate_encoded(samples: list) -> tuple[list[int], list[torch.Tensor], torch.Tensor]:
    if not samples:
        return [], [], torch.empty(0, dtype=torch.int64)
    indices, data, labels = zip(*samples)
    return list(indices), list(data), torch.stack(labels)


class _Batches:
    """Sized iterable of normalised ``(x, y)`` batches on the device over a DataLoader of one split.

    Data-parallel: rank ``rank`` of ``world_size`` loads only its ``rank_slice`` of every global batch.
    """

    def __init__(self, data: ImageFolderData, images: ImageList, epoch: int | None, rank: int, world_size: int):
        self._data, self._images, self._epoch = data, images, epoch
        self._rank, self._world_size = rank, world_size

    def __len__(self) -> int:
        return math.ceil(len(self._images) / self._data.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data, epoch, n = self._data, self._epoch, len(self._images)
        order = (
            range(n)
            if epoch is None
            else torch.randperm(n, generator=seeded_generator(data.seed, _STREAM_EPOCH, epoch)).tolist()
        )
        batches = _RankBatches(BatchSampler(order, data.batch_size, drop_last=False), self._rank, self._world_size)
        gpu = data.decode == "gpu"
        crop_epoch = epoch if data.augment else None  # None: the evaluation view
        dataset = (
            _EncodedImages(self._images)
            if gpu
            else _DecodedImages(self._images, data.image_size, data.resize_size, data.seed, crop_epoch)
        )
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=data.num_workers,
            pin_memory=data.device.type == "cuda" and not gpu,
            collate_fn=_collate_encoded if gpu else partial(_collate_decoded, data.image_size),
        )
        for batch in loader:
            if gpu:
                indices, encoded, labels = batch
                images = data.decode_on_device(encoded, indices, crop_epoch)
            else:
                images, labels = batch
            yield data.normalize(images), labels.to(data.device, non_blocking=True)


class ImageFolderData:
    """Train/val splits of an image-folder tree and their batch pipelines (the DataModule interface).

    ``train_batches(epoch)`` is shuffled and augmented, a pure function of ``(seed, epoch)``; ``test_batches()``
    is the val split in file order. Batches are float32 normalised ``x`` and int64 ``y`` on ``device``.
    """

    def __init__(
        self,
        *,
        name: str,
        root,
        image_size: int,
        resize_size: int,
        batch_size: int,
        num_workers: int,
        decode: str,
        augment: bool,
        seed: int,
        device: torch.device | str = "cpu",
    ):
        self.name = name
        self.root = Path(root).expanduser()
        self.device = torch.device(device)
        self.image_size, self.resize_size = image_size, resize_size
        self.batch_size, self.num_workers, self.augment, self.seed = batch_size, num_workers, augment, seed
        self.train_images = scan_split(self.root, "train")
        self.test_images = scan_split(self.root, "val", self.train_images.classes)
        self.classes = self.train_images.classes
        self.num_classes = len(self.classes)
        self.input_size = (3, image_size, image_size)
        self.num_train, self.num_test = len(self.train_images), len(self.test_images)
        all_jpeg = all(p.lower().endswith(JPEG_SUFFIXES) for p in self.train_images.paths + self.test_images.paths)
        if decode == "gpu" and (self.device.type != "cuda" or not all_jpeg):
            raise ConfigError(
                f"dataset.decode=gpu needs trainer.device on CUDA and JPEG files only (device "
                f"{self.device}{'' if all_jpeg else ', some files are not JPEG'}); use cpu or auto"
            )
        self.decode = ("gpu" if self.device.type == "cuda" and all_jpeg else "cpu") if decode == "auto" else decode
        mean, std = (torch.tensor(v, device=self.device).view(1, 3, 1, 1) for v in IMAGENET_NORMALIZATION)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std
        log.info(
            "%s: %d train / %d val images in %d classes from %s, %dx%d crops, decode=%s, %d workers",
            name,
            self.num_train,
            self.num_test,
            self.num_classes,
            self.root,
            image_size,
            image_size,
            self.decode,
            num_workers,
        )

    @property
    def num_train_batches(self) -> int:
        return math.ceil(self.num_train / self.batch_size)

    @property
    def num_test_batches(self) -> int:
        return math.ceil(self.num_test / self.batch_size)

    def train_batches(self, epoch: int, rank: int = 0, world_size: int = 1) -> _Batches:
        """The shuffled, augmented batches of ``epoch``: the same for the same ``(seed, epoch)``; with
        ``world_size`` > 1, rank ``rank``'s part of each global batch (together exactly the single-process batch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        _check_shard(rank, world_size)
        return _Batches(self, self.train_images, epoch, rank, world_size)

    def test_batches(self, rank: int = 0, world_size: int = 1) -> _Batches:
        """The val split in file order, Resize + CenterCrop (this rank's part of each batch, as above)."""
        _check_shard(rank, world_size)
        return _Batches(self, self.test_images, None, rank, world_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``B x 3 x H x W`` -> float32 on the device, ``(u8 / 255 - mean) / std``: the one non-uint8 step."""
        images = images.to(self.device, non_blocking=True)
        return images.float().mul_(self._scale).add_(self._shift)

    def decode_on_device(self, encoded: list[torch.Tensor], indices: list[int], epoch: int | None) -> torch.Tensor:
        """Decode a batch of JPEG bytes on the GPU in one call, then crop/resize each image there (uint8)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not encoded:
            return torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8, device=self.device)
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        if epoch is None:
            views = [eval_view(image, self.image_size, self.resize_size) for image in decoded]
        else:
            views = [
                train_view(image, self.image_size, sample_generator(self.seed, epoch, i))
                for image, i in zip(decoded, indices)
            ]
        return torch.stack(views)


def _image_folder(
    name: str,
    root,
    image_size,
    resize_size,
    batch_size,
    num_workers,
    decode,
    augment,
    seed,
    device,
    num_classes,
    input_size,
) -> ImageFolderData:
    """Validate the settings, then scan the tree; num_classes/input_size, when given, must be the data's."""
    _check_int("image_size", image_size, 1)
    _check_int("resize_size", resize_size, 1)
    if resize_size < image_size:
        raise ConfigError(f"dataset.resize_size must be >= dataset.image_size ({image_size}), got {resize_size}")
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    _check_int("seed", seed, 0)
    _check_choice("decode", decode, DECODERS)
    _check_bool("augment", augment)
    if root is None:
        raise ConfigError(f"dataset.root must be the folder holding train/ and val/ for {name}")
    data = ImageFolderData(
        name=name,
        root=root,
        image_size=image_size,
        resize_size=resize_size,
        batch_size=batch_size,
        num_workers=num_workers,
        decode=decode,
        augment=augment,
        seed=seed,
        device=device,
    )
    if num_classes is not None and num_classes != data.num_classes:
        raise ConfigError(
            f"dataset.num_classes={num_classes} but {data.root}/train has {data.num_classes} class "
            "folders; leave it null (read from the data)"
        )
    if input_size is not None and tuple(input_size) != data.input_size:
        raise ConfigError(
            f"dataset.input_size={list(input_size)} but the crops are {list(data.input_size)}; "
            "leave it null (set dataset.image_size)"
        )
    return data


def imagefolder(
    *,
    name: str = "imagefolder",
    root=None,
    image_size: int = 224,
    resize_size: int = 256,
    batch_size: int = 256,
    num_workers: int = 8,
    decode: str = "auto",
    augment: bool = True,
    seed: int = 0,
    num_classes: int | None = None,
    input_size=None,
    device="cpu",
) -> ImageFolderData:
    """Any ``root/{train,val}/<class>/<image>`` tree with the ImageNet pipeline; classes and size from the data."""
    return _image_folder(
        name,
        root,
        image_size,
        resize_size,
        batch_size,
        num_workers,
        decode,
        augment,
        seed,
        device,
        num_classes,
        input_size,
    )


def imagenet(
    *,
    name: str = "imagenet",
    root=None,
    image_size: int = 224,
    resize_size: int = 256,
    batch_size: int = 256,
    num_workers: int = 8,
    decode: str = "auto",
    augment: bool = True,
    seed: int = 0,
    num_classes: int | None = None,
    input_size=None,
    device="cpu",
) -> ImageFolderData:
    """ImageNet-1k in its ImageFolder layout (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``)."""
    return _image_folder(
        name,
        root,
        image_size,
        resize_size,
        batch_size,
        num_workers,
        decode,
        augment,
        seed,
        device,
        num_classes,
        input_size,
    )
