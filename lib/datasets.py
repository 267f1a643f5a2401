"""A data set in memory for training and inference: aspect-true resizing, normalisation, whole splits as
tensors (:func:`load_split`), streamed splits (:class:`StreamedSplit`) and the augmented training view.
The files they read are described in :mod:`wsss.lib.dataset_format`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from wsss.lib.dataset_format import DatasetIndex
from wsss.lib.errors import WsssError
from wsss.lib.images import decode_mask_png, read_image, read_mask, to_uint8
from wsss.lib.metrics import IGNORE_INDEX


def aspect_size(height: int, width: int, size: int, multiple: int = 1) -> tuple[int, int]:
    """The ``(h, w)`` an image of ``height x width`` is resized to for the models: its longer side ``size``,
    the shorter one at the image's own aspect ratio, both rounded to a multiple of ``multiple`` (the ViT's
    patch, the segmenter's output stride; at least one multiple). A square image gets ``size x size``."""
    scale = size / max(height, width)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))


@dataclass
class SplitData:
    """Some images of a split in memory, each resized to its :func:`aspect_size` (or as they are)."""

    ids: list[str]
    images: list[torch.Tensor]  # uint8 [channels, h, w] each
    labels: torch.Tensor  # float32 [N, C]
    masks: list[torch.Tensor] | None  # uint8 [h, w] each; 255 = ignore
    original_sizes: list[tuple[int, int]]  # (H, W) before resizing

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int) -> torch.Tensor:
        """uint8 ``[channels, h, w]`` of item ``index``."""
        return self.images[index]

    def mask(self, index: int) -> torch.Tensor | None:
        """uint8 ``[h, w]`` of item ``index`` (None without masks)."""
        return self.masks[index] if self.masks is not None else None


class StreamedSplit:
    """One split read from its files item by item (the pixels :func:`load_split` would hold): only the
    manifest's rows live in memory, so DataLoader workers decode the images where they are used.

    Args:
        dataset: the data set.
        split: its split.
        size: items are resized to :func:`aspect_size` ``(H, W, size, multiple)`` (images bilinear,
            antialiased; masks nearest-exact); None: served at their original size (training crops
            are cut from those, :class:`AugmentedSplit`).
        multiple: see :func:`aspect_size`.
        with_masks: serve the ground-truth masks (all-ignore where an image has none).
        masks: serve these original-size masks ``{id: HxW array or PNG bytes}`` instead (e.g. the
            pseudo-mask table, kept encoded: one mask is decoded per item).
    """

    def __init__(
        self,
        dataset: DatasetIndex,
        split: str,
        size: int | None = None,
        multiple: int = 1,
        with_masks: bool = False,
        masks: dict[str, np.ndarray | bytes] | None = None,
    ) -> None:
        rows = dataset.split(split)
        if with_masks and rows["mask"].isna().all():
            raise WsssError(f"{dataset.root}: split {split!r} has no masks")
        self.dataset, self.size, self.multiple = dataset, size, multiple
        self.ids = rows["id"].tolist()
        self.image_paths = rows["image"].tolist()
        self.mask_paths = rows["mask"].tolist() if with_masks else None
        self.given_masks = masks
        self.labels = torch.from_numpy(np.stack(rows["labels"].to_list()).astype(np.float32))
        self.original_sizes = list(zip(rows["height"].tolist(), rows["width"].tolist(), strict=True))

    def __len__(self) -> int:
        return len(self.ids)

    def _target(self, index: int) -> tuple[int, int] | None:
        return None if self.size is None else aspect_size(*self.original_sizes[index], self.size, self.multiple)

    def image(self, index: int) -> torch.Tensor:
        image = to_uint8(read_image(self.dataset.path(self.image_paths[index])), self.dataset.bands)
        return image_tensor(image, self._target(index))

    def original_mask(self, index: int) -> np.ndarray | None:
        """The item's mask at its original size (all-ignore when the image has none; None without masks)."""
        if self.given_masks is not None:
            mask = self.given_masks[self.ids[index]]
            if isinstance(mask, bytes):
                return decode_mask_png(mask, f"mask of {self.ids[index]!r}")
            return np.asarray(mask).astype(np.uint8)
        if self.mask_paths is None:
            return None
        if isinstance(self.mask_paths[index], str):
            return read_mask(self.dataset.path(self.mask_paths[index]))
        return np.full(self.original_sizes[index], IGNORE_INDEX, dtype=np.uint8)

    def mask(self, index: int) -> torch.Tensor | None:
        mask = self.original_mask(index)
        if mask is None:
            return None
        target = self._target(index)
        return _resize(torch.from_numpy(mask), target, is_mask=True) if target else torch.from_numpy(mask)


def masks_digest(data: StreamedSplit) -> str:
    """sha256 of every served mask's bytes and shape in order (the training masks' identity)."""
    digest = hashlib.sha256()
    for index in range(len(data)):
        mask = data.mask(index).contiguous()
        digest.update(np.asarray(mask.shape, np.int64).tobytes() + mask.numpy().tobytes())
    return digest.hexdigest()


class _Images(torch.utils.data.Dataset):
    """The uint8 images of a split, for a DataLoader (see :func:`image_batches`)."""

    def __init__(self, data: SplitData | StreamedSplit) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data.image(index)


def _as_list(items: list[torch.Tensor]) -> list[torch.Tensor]:
    return items  # a DataLoader's collate_fn: images of several sizes stay apart


def shape_groups(images: list[torch.Tensor], offset: int = 0) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Stacks the images of one size together: ``(positions + offset, [n, channels, h, w])`` per size, in
    order of first appearance (images of one size: a single group, in order)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(position)
    for positions in groups.values():
        yield [offset + p for p in positions], torch.stack([images[p] for p in positions])


def image_batches(
    data: SplitData | StreamedSplit, batch_size: int, num_workers: int = 0
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The split's uint8 images as model batches ``(indices, [n, channels, h, w])``: runs of ``batch_size``
    consecutive images, each cut into groups of one size (:func:`shape_groups`); a streamed split is
    decoded by ``num_workers`` DataLoader processes. A split of one image size gives the batches
    ``images[k * batch_size : (k + 1) * batch_size]`` in order."""
    if isinstance(data, SplitData):
        runs = (data.images[start : start + batch_size] for start in range(0, len(data), batch_size))
    else:
        runs = torch.utils.data.DataLoader(
            _Images(data), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
        )
    offset = 0
    for run in runs:
        yield from shape_groups(list(run), offset)
        offset += len(run)


def _resize(x: torch.Tensor, size: int | tuple[int, int], is_mask: bool) -> torch.Tensor:
    """Resizes a [..., H, W] tensor to ``size`` (``(h, w)``, or an int for a square): bilinear with
    antialiasing, nearest-exact for label maps."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    batch = x.reshape(-1, 1 if is_mask else x.shape[-3], *x.shape[-2:]).float()
    if is_mask:
        out = F.interpolate(batch, size=size, mode="nearest-exact")
    else:
        out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    if not x.dtype.is_floating_point:
        out = out.round_().clamp_(0, 255)
    return out.to(x.dtype).reshape(*x.shape[:-2], *size)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 label mask ``[H, W]`` at ``size`` (nearest-exact, as items are resized; the same array when
    it has that size already)."""
    return mask if tuple(mask.shape) == tuple(size) else _resize(torch.from_numpy(mask), size, is_mask=True).numpy()


def image_tensor(image_uint8: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
    """HxWxC uint8 image -> uint8 [C, h, w] tensor resized to ``size`` (bilinear, antialiased; None: as is)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image_uint8)).permute(2, 0, 1)
    return tensor if size is None else _resize(tensor, size, is_mask=False)


def load_split(dataset: DatasetIndex, split: str, size: int, with_masks: bool, multiple: int = 1) -> SplitData:
    """Loads the images (and masks) of a split into memory, each resized to its :func:`aspect_size`
    ``(H, W, size, multiple)``: for inference on a few images (a streamed split serves the rest).

    Images without a mask get an all-ignore (255) mask, so metrics skip them.

    Raises:
        WsssError: empty split, unreadable file, or ``with_masks`` on a split with no masks at all.
    """
    data = StreamedSplit(dataset, split, size, multiple, with_masks=with_masks)
    return SplitData(
        ids=data.ids,
        images=[data.image(i) for i in range(len(data))],
        labels=data.labels,
        masks=[data.mask(i) for i in range(len(data))] if with_masks else None,
        original_sizes=data.original_sizes,
    )


_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255
# Other channel counts: the bands are stretched to 0..255 (see the module docstring), so about uniform.
_BAND_MEAN, _BAND_STD = 0.5 * 255, 0.25 * 255


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """Normalises [..., C, H, W] images in 0..255: ImageNet mean/std when C = 3 (pretrained timm weights),
    ``(x / 255 - 0.5) / 0.25`` for any other channel count."""
    if images_uint8.shape[-3] != 3:
        return (images_uint8.float() - _BAND_MEAN) / _BAND_STD
    return (images_uint8.float() - _MEAN.to(images_uint8.device)) / _STD.to(images_uint8.device)


class AugmentedSplit(torch.utils.data.Dataset):
    """Serves (normalised image, labels, mask) from a split, with train-time crop + flip.

    Training crops are cut from the image at its original size, as torchvision's (and MCTformer's)
    RandomResizedCrop cuts them: a box of area ``[crop_scale_min, 1]`` of the image and aspect ratio
    3/4..4/3, resized to ``size x size``, then a horizontal flip with probability 1/2; the mask gets the
    same box (nearest-exact). A photo is thus never squashed by more than 4/3, and an image that is
    already ``size x size`` is cropped exactly as before this path existed.

    The randomness of item ``i`` depends only on ``(seed, epoch, i)``, so results do not depend on the
    sampler order or on DataLoader workers; call :meth:`set_epoch` each epoch for fresh augmentations.

    Args:
        data: the split (in memory or streamed); original-size items for training.
        train: apply the crop and flip (else items are served as they are).
        size: the side of the training crops.
        crop_scale_min: smallest crop area as a fraction of the image.
        seed: augmentation seed.
    """

    def __init__(
        self,
        data: SplitData | StreamedSplit,
        train: bool,
        size: int | None = None,
        crop_scale_min: float = 0.6,
        seed: int = 0,
    ) -> None:
        if train and size is None:
            raise ValueError("AugmentedSplit(train=True) needs the crop size")
        self.data = data
        self.train = train
        self.size = size
        self.crop_scale_min = crop_scale_min
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def _crop_box(self, generator: torch.Generator, height: int, width: int) -> tuple[int, int, int, int]:
        """Samples (top, left, h, w) like torchvision's RandomResizedCrop, falling back to the full image."""
        log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
        for _ in range(10):
            u_area, u_ratio, u_top, u_left = torch.rand(4, generator=generator).tolist()
            area = height * width * (self.crop_scale_min + (1 - self.crop_scale_min) * u_area)
            ratio = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
        # torchvision's fallback: a centre crop at the nearest allowed aspect ratio
        ratio = min(max(width / height, 3 / 4), 4 / 3)
        w, h = (width, round(width / ratio)) if width / height < ratio else (round(height * ratio), height)
        return (height - h) // 2, (width - w) // 2, h, w

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (epoch, index) from an EpochSampler: persistent DataLoader workers keep their own copy of this
        # object, so the epoch travels with the index instead of through set_epoch.
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        image = self.data.image(index)
        mask = self.data.mask(index)
        if self.train:
            state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(state))
            top, left, h, w = self._crop_box(generator, *image.shape[-2:])
            # Resize in float: the result is normalised anyway, so rounding to uint8 would only lose detail.
            image = _resize(image[:, top : top + h, left : left + w].float(), self.size, is_mask=False)
            if mask is not None:
                mask = _resize(mask[top : top + h, left : left + w], self.size, is_mask=True)
            if torch.rand(1, generator=generator).item() < 0.5:
                image = image.flip(-1)
                mask = mask.flip(-1) if mask is not None else None
        mask = mask.long() if mask is not None else torch.empty(0, dtype=torch.long)
        return normalize(image), self.data.labels[index], mask
