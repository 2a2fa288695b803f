"""Training data for supernets: sources, the held-out search split, augmentation.

``--data`` takes one of:

* ``synthetic`` (or ``synthetic:N`` for N training images, ``synthetic:N:C`` for C classes):
  a built-in, seeded, generated dataset of 10 classes unless C says otherwise (see
  :func:`synthetic_images`); no download. With more classes width matters more: the demo's
  20 classes need more features than a narrow network's last layers hold;
* ``cifar10`` / ``cifar100`` (or ``cifar10:ROOT``): torchvision's own loaders
  (``download=True`` fetches them);
* a directory in ImageFolder layout: ``train/<class>/*.jpg`` and ``val/`` or ``test/``
  beside it (ImageNet, or ``/work/shared/data/cifar10``).

AutoSlim scores candidate configs on a **search split** held out of the *training*
set (never the test set). :func:`build_data` carves it out at random (seeded) and
records everything needed to rebuild it in a plain ``data`` dict that goes into the
checkpoint; :func:`search_split` and :func:`validation_split` rebuild the images from
that dict alone::

    >>> ckpt = load_checkpoint("runs/r20/checkpoint.pt")
    >>> x, y = search_split(ckpt, max_images=2000)    # eval transform, normalized, NCHW

Small datasets (inputs up to 64 px) are decoded once and kept in memory as uint8
tensors, on the GPU when training there, and augmented there (CIFAR-style pad-crop
and flip), so an epoch is not bound by image decoding. Large inputs (ImageNet at 224)
stream through a ``DataLoader`` with RandomResizedCrop and flip.

The ``data`` dict (format ``hwslim-data`` version 1) holds: ``kind``, ``spec``,
``root``, ``input_size``, ``num_classes``, ``classes``, ``mean``, ``std``,
``num_train_total`` (training images before the split), ``val_split``, ``num_val``,
``search_seed``, ``search_indices`` (sorted indices into the training set) and, for
synthetic data, ``synthetic_seed``. A run on a subset of the training set
(``train_subset``: N images, class-balanced, seeded; see :func:`balanced_subset`)
also records ``train_subset``, ``train_subset_seed`` and ``train_subset_indices``;
the search split is then carved out of those N images.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from hwslim.core.errors import HwslimError

DATA_FORMAT = "hwslim-data"
DATA_VERSION = 1

# per-channel statistics of each source, on the 0..1 scale
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC_MEAN, SYNTHETIC_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

SYNTHETIC_CLASSES = 10
SYNTHETIC_NUM_TRAIN = 10_000
SYNTHETIC_NUM_VAL = 2_000
SMALL_INPUT = 64  # inputs up to this size are kept in memory and get CIFAR-style augmentation
_CHUNK = 256  # synthetic images are generated in seeded chunks, so any subset is cheap to rebuild
_EVAL_CROP = 0.875  # large inputs: resize to size / 0.875, then center-crop (ImageNet's protocol)


class DataError(HwslimError):
    """A dataset that cannot be found, read or rebuilt as recorded."""


# -- the --data spec ----------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: ``kind`` is synthetic, cifar10, cifar100 or imagefolder."""

    kind: str
    root: str | None = None
    num_train: int | None = None  # synthetic only
    text: str = ""
    num_classes: int | None = None  # synthetic only (None: SYNTHETIC_CLASSES)


def parse_data_spec(spec: str) -> DataSpec:
    """Parse ``--data``: ``synthetic[:N[:C]]``, ``cifar10[:ROOT]``, ``cifar100[:ROOT]`` or a directory."""
    text = str(spec)
    name, _, arg = text.partition(":")
    if name == "synthetic":
        arg, _, c = arg.partition(":")
        n = _synthetic_count(arg, "N", "training images") if arg else None
        classes = _synthetic_count(c, "C", "classes") if c else None
        return DataSpec("synthetic", None, n, text, classes)
    if name in ("cifar10", "cifar100"):
        root = arg or os.environ.get("HWSLIM_DATA", str(Path.home() / ".cache" / "hwslim" / "data"))
        return DataSpec(name, root, None, text)
    path = Path(text).expanduser()
    if not path.is_dir():
        raise DataError(f"--data {text!r}: not 'synthetic', 'cifar10', 'cifar100' or an existing directory")
    return DataSpec("imagefolder", str(path.resolve()), None, text)


def _synthetic_count(text: str, letter: str, what: str) -> int:
    """N or C of ``synthetic:N:C``: a whole number >= 2."""
    try:
        n = int(text)
    except ValueError:
        raise DataError(f"--data synthetic:N:C needs an integer {letter} ({what}), got {text!r}") from None
    if n < 2:
        raise DataError(f"--data synthetic:N:C needs {letter} >= 2 ({what}), got {n}")
    return n


# -- synthetic data ---------------------------------------------------------------------
def mix_seeds(*values: int) -> int:
    """A 63-bit seed from several ints (splitmix64-style), so streams never overlap."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _gabor(xx: torch.Tensor, yy: torch.Tensor, theta: torch.Tensor, freq: torch.Tensor, phase: torch.Tensor,
           cx: torch.Tensor, cy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A batch of Gaussian-windowed gratings, (n, H, W); all parameters are (n,) tensors."""
    t = theta[:, None, None]
    u = xx * torch.cos(t) + yy * torch.sin(t)
    wave = torch.cos(2 * math.pi * freq[:, None, None] * u + phase[:, None, None])
    r2 = (xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2
    return wave * torch.exp(-r2 / (2 * sigma[:, None, None] ** 2))


# Class definitions are fixed (not seeded by the data seed): every synthetic dataset poses
# the same task, and the seed only draws other samples of it.
_PROTOTYPES_PER_CLASS = 1
_ELEMENTS = 2
_SHIFT = 0.15  # how far a prototype moves (image half-width = 1)
_DISTRACT = (0.1, 0.25)  # contrast of the random distractor texture
_NOISE = 0.05
_PALETTE = torch.tensor([[1.0, 0.25, 0.2], [0.2, 0.9, 0.3], [0.25, 0.35, 1.0], [0.95, 0.85, 0.15],
                         [0.85, 0.2, 0.9], [0.2, 0.85, 0.9]])


def _prototypes(classes: int = SYNTHETIC_CLASSES) -> dict[str, torch.Tensor]:
    """Per (class, prototype, element): offset, orientation, frequency, size and colour."""
    g = torch.Generator().manual_seed(20240531)
    shape = (classes, _PROTOTYPES_PER_CLASS, _ELEMENTS)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    return {"dx": u(-0.35, 0.35), "dy": u(-0.35, 0.35), "theta": u(0, math.pi), "freq": u(0.8, 2.4),
            "sigma": u(0.2, 0.32), "colour": torch.randint(0, len(_PALETTE), shape, generator=g)}


def _synthetic_chunk(seed: int, split: int, chunk: int, size: int,
                     classes: int = SYNTHETIC_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(mix_seeds(seed, split, chunk))
    n, e = _CHUNK, _ELEMENTS

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*(shape or (n,)), generator=g)

    # A class is a prototype (or a mixture of _PROTOTYPES_PER_CLASS): 2 oriented textures
    # (Gabor patches) at fixed relative offsets, each with its own orientation, frequency,
    # size and palette colour. A sample shifts the prototype, re-draws phases and contrast,
    # jitters orientation and frequency, and adds a weaker random texture of any
    # orientation and colour, a colour blob, low-frequency shading and noise. No single
    # feature names the class (colours and orientations recur across classes), so a net
    # needs conjunctions of many detectors: narrow configs score clearly below wide ones.
    # (Harder settings, e.g. 4 prototypes per class, separate widths more but need far
    # more steps than a CPU test can afford.)
    labels = torch.randint(0, classes, (n,), generator=g)
    proto = torch.randint(0, _PROTOTYPES_PER_CLASS, (n,), generator=g)
    p = {k: v[labels, proto] for k, v in _prototypes(classes).items()}  # each (n, e)
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    tx, ty = u(-_SHIFT, _SHIFT)[:, None], u(-_SHIFT, _SHIFT)[:, None]
    theta = p["theta"] + 0.05 * torch.randn(n, e, generator=g)
    freq = p["freq"] * u(0.93, 1.07, n, e)
    tex = _gabor(xx, yy, theta.reshape(-1), freq.reshape(-1), u(0, 2 * math.pi, n * e),
                 (p["dx"] + tx).reshape(-1), (p["dy"] + ty).reshape(-1), p["sigma"].reshape(-1))
    tex = tex.view(n, e, size, size) * u(0.6, 1.0, n, e)[:, :, None, None]
    colour = _PALETTE[p["colour"]]  # (n, e, 3)
    img = u(0.3, 0.7, n, 3)[:, :, None, None].expand(n, 3, size, size).clone()
    img += 0.06 * F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear",
                               align_corners=False)
    img += 0.55 * torch.einsum("nehw,nec->nchw", tex, colour)
    distract = _gabor(xx, yy, u(0, math.pi), u(0.8, 2.4), u(0, 2 * math.pi), u(-0.7, 0.7), u(-0.7, 0.7),
                      u(0.15, 0.3)) * u(*_DISTRACT)[:, None, None]
    img += 0.4 * distract[:, None] * _PALETTE[torch.randint(0, len(_PALETTE), (n,), generator=g)][:, :, None, None]
    r2 = (xx - u(-0.8, 0.8)[:, None, None]) ** 2 + (yy - u(-0.8, 0.8)[:, None, None]) ** 2
    img += torch.exp(-r2 / (2 * u(0.08, 0.2)[:, None, None] ** 2))[:, None] * u(-0.2, 0.2, n, 3)[:, :, None, None]
    img += _NOISE * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


def synthetic_images(indices: Sequence[int] | torch.Tensor, *, seed: int = 0, input_size: int = 32,
                     split: str = "train", classes: int = SYNTHETIC_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``indices`` of the synthetic dataset: (uint8 N x 3 x S x S, int64 labels).

    Image *i* depends only on (seed, split, i), so any subset is rebuilt exactly without
    generating the rest. Each class is a pair of oriented, coloured textures at fixed
    relative offsets, shifted at random, with random phase and contrast, under a weaker
    distractor texture, a colour blob, shading and noise: learnable in a few hundred
    steps, but narrow networks score clearly below wide ones, the more so the more ``classes``
    (the demo's 20 classes after its 5 epochs: 47.4% widest vs 20.3% narrowest; 10 classes: 83.5%
    vs 78.9%). ``split`` is ``"train"`` or ``"val"``.
    """
    split_id = {"train": 0, "val": 1}[split]
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    out = torch.empty(len(idx), 3, input_size, input_size, dtype=torch.uint8)
    labels = torch.empty(len(idx), dtype=torch.int64)
    if len(idx) == 0:
        return out, labels
    chunks = idx // _CHUNK
    for c in torch.unique(chunks).tolist():
        pos = (chunks == c).nonzero().squeeze(1)
        imgs, labs = _synthetic_chunk(seed, split_id, c, input_size, classes)
        local = idx[pos] - c * _CHUNK
        out[pos] = imgs[local]
        labels[pos] = labs[local]
    return out, labels


# -- sources: the raw images of one dataset, decoded to uint8 at the input size --------
class _Source:
    kind = ""
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_split = "val"

    def __init__(self, input_size: int) -> None:
        self.input_size = int(input_size)

    @property
    def in_memory(self) -> bool:
        return self.input_size <= SMALL_INPUT

    def num_train(self) -> int:
        raise NotImplementedError

    def num_val(self) -> int:
        raise NotImplementedError

    def train_labels(self) -> torch.Tensor:
        raise NotImplementedError

    def load(self, split: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (eval view: resized/center-cropped to the input size) and labels."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_size": self.input_size, "num_classes": len(self.classes),
                "classes": list(self.classes), "mean": list(self.mean), "std": list(self.std),
                "num_train_total": self.num_train(), "val_split": self.val_split, "num_val": self.num_val()}


class _SyntheticSource(_Source):
    kind = "synthetic"
    mean, std = SYNTHETIC_MEAN, SYNTHETIC_STD

    def __init__(self, input_size: int, seed: int, num_train: int, num_val: int,
                 classes: int = SYNTHETIC_CLASSES) -> None:
        super().__init__(input_size)
        self.seed, self._n_train, self._n_val = int(seed), int(num_train), int(num_val)
        self.classes = [f"class{i}" for i in range(classes)]

    @property
    def in_memory(self) -> bool:
        return True  # generated: always a tensor

    def num_train(self) -> int:
        return self._n_train

    def num_val(self) -> int:
        return self._n_val

    def load(self, split: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return synthetic_images(indices, seed=self.seed, input_size=self.input_size, split=split,
                                classes=len(self.classes))

    def train_labels(self) -> torch.Tensor:
        return self.load("train", torch.arange(self._n_train))[1]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "synthetic_seed": self.seed}


def _resize_uint8(x: torch.Tensor, size: int, crop: float = 1.0) -> torch.Tensor:
    """Resize the short side to ``size / crop`` and center-crop ``size`` (uint8 N x C x H x W)."""
    from torchvision.transforms.v2 import functional as TF

    if x.shape[-2:] == (size, size):
        return x
    x = TF.resize(x, int(round(size / crop)), antialias=True)
    return TF.center_crop(x, [size, size])


class _CifarSource(_Source):
    """torchvision's CIFAR-10/100 (arrays already in memory)."""

    def __init__(self, kind: str, root: str, input_size: int, download: bool) -> None:
        import torchvision

        super().__init__(input_size)
        self.kind, self.root = kind, root
        cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
        self.mean, self.std = (CIFAR10_MEAN, CIFAR10_STD) if kind == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        self.val_split = "test"
        try:
            sets = {s: cls(root, train=(s == "train"), download=download) for s in ("train", "test")}
        except Exception as e:  # missing files (RuntimeError), no network (URLError), corrupt archive
            hint = "" if download else " (pass --download to fetch it)"
            raise DataError(f"cannot load {kind} from {root}{hint}: {str(e).splitlines()[0][:160]}") from None
        self.classes = list(sets["train"].classes)
        self._images = {s: torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous() for s, d in sets.items()}
        self._labels = {s: torch.as_tensor(d.targets, dtype=torch.int64) for s, d in sets.items()}

    def num_train(self) -> int:
        return len(self._labels["train"])

    def num_val(self) -> int:
        return len(self._labels["test"])

    def train_labels(self) -> torch.Tensor:
        return self._labels["train"]

    def load(self, split: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        split = "train" if split == "train" else "test"
        x = self._images[split][indices]
        return _resize_uint8(x, self.input_size, 1.0 if self.in_memory else _EVAL_CROP), self._labels[split][indices]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "root": self.root}


class _FolderSource(_Source):
    """An ImageFolder directory: ``train/`` plus ``val/`` or ``test/`` with the same classes."""

    kind = "imagefolder"

    def __init__(self, root: str, input_size: int) -> None:
        from torchvision.datasets import ImageFolder

        super().__init__(input_size)
        self.root = str(root)
        base = Path(root)
        if not (base / "train").is_dir():
            raise DataError(f"{root}: an ImageFolder dataset needs a train/ directory "
                            "(train/<class>/<image>, plus val/ or test/)")
        val = next((s for s in ("val", "test") if (base / s).is_dir()), None)
        if val is None:
            raise DataError(f"{root}: found train/ but neither val/ nor test/ beside it")
        self.val_split = val
        try:
            self._sets = {"train": ImageFolder(str(base / "train")), "val": ImageFolder(str(base / val))}
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"{root}: {e}") from None
        self.classes = list(self._sets["train"].classes)
        if self._sets["val"].classes != self.classes:
            raise DataError(f"{root}: train/ and {val}/ have different class folders")
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (indices, images, labels)

    def restrict(self, pool: torch.Tensor) -> None:
        """Use only the training images ``pool`` (sorted indices; a --train-subset): small
        images are decoded once for those only, and the statistics come from them."""
        pool = torch.as_tensor(pool, dtype=torch.int64)
        if self.in_memory:
            x, y = self._decode(self.samples("train"), pool.tolist())
            self._pool = (pool, x, y)
        else:
            self._pool = (pool, None, None)

    def num_train(self) -> int:
        return len(self._sets["train"])

    def num_val(self) -> int:
        return len(self._sets["val"])

    def samples(self, split: str) -> list[tuple[str, int]]:
        return self._sets["train" if split == "train" else "val"].samples

    def train_labels(self) -> torch.Tensor:
        return torch.as_tensor(self._sets["train"].targets, dtype=torch.int64)

    def decode_all(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a whole (small) split once; kept for the life of this source."""
        if split not in self._cache:
            self._cache[split] = self._decode(self.samples(split), range(len(self.samples(split))))
        return self._cache[split]

    def _decode(self, samples: list[tuple[str, int]], indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = _DecodeDataset(samples, list(indices), self.input_size, 1.0 if self.in_memory else _EVAL_CROP)
        workers = min(8, os.cpu_count() or 1) if len(dataset) > 2000 else 0
        loader = torch.utils.data.DataLoader(dataset, batch_size=512, num_workers=workers)
        xs, ys = zip(*loader) if len(dataset) else ((), ())
        if not xs:
            return (torch.empty(0, 3, self.input_size, self.input_size, dtype=torch.uint8),
                    torch.empty(0, dtype=torch.int64))
        return torch.cat(xs), torch.cat(ys)

    def load(self, split: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        split = "train" if split == "train" else "val"
        if split in self._cache:
            x, y = self._cache[split]
            return x[indices], y[indices]
        if split == "train" and self._pool is not None and self._pool[1] is not None:
            pool, px, py = self._pool
            pos = torch.searchsorted(pool, indices)
            if bool((pos < len(pool)).all()) and bool((pool[pos.clamp(max=len(pool) - 1)] == indices).all()):
                return px[pos], py[pos]
        return self._decode(self.samples(split), indices.tolist())

    def info(self) -> dict[str, Any]:
        if self.in_memory:  # small images: use the training set's own statistics (decoded anyway)
            x = self._pool[1] if self._pool is not None else self.decode_all("train")[0]
            flat = x.transpose(0, 1).reshape(3, -1)
            mean = torch.stack([c.float().mean() for c in flat]) / 255
            std = torch.stack([c.float().std() for c in flat]) / 255
            self.mean = tuple(round(float(v), 4) for v in mean)
            self.std = tuple(round(float(v), 4) for v in std)
        return {**super().info(), "root": self.root}


def _read_rgb(path: str) -> torch.Tensor:
    """Decode one image file to uint8 RGB CHW (PIL, as torchvision's ImageFolder does)."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        with Image.open(path) as im:
            return pil_to_tensor(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"cannot decode {path}: {str(e).splitlines()[0][:120]}") from None


class _DecodeDataset(torch.utils.data.Dataset):
    """Decode (and resize) images by index to uint8 CHW tensors; used by DataLoader workers."""

    def __init__(self, samples: list[tuple[str, int]], indices: list[int], size: int, crop: float) -> None:
        self.samples, self.indices, self.size, self.crop = samples, indices, size, crop

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[self.indices[i]]
        return _resize_uint8(_read_rgb(path)[None], self.size, self.crop)[0], label


def _open_source(spec: DataSpec, input_size: int, *, seed: int = 0, download: bool = False,
                 num_val: int | None = None) -> _Source:
    if spec.kind == "synthetic":
        return _SyntheticSource(input_size, seed, spec.num_train or SYNTHETIC_NUM_TRAIN,
                                num_val or SYNTHETIC_NUM_VAL, spec.num_classes or SYNTHETIC_CLASSES)
    if spec.kind in ("cifar10", "cifar100"):
        return _CifarSource(spec.kind, spec.root, input_size, download)
    return _FolderSource(spec.root, input_size)


def _source_from_info(info: dict[str, Any]) -> _Source:
    if not info or info.get("format") != DATA_FORMAT:
        raise DataError("the checkpoint records no dataset (no 'hwslim-data' dict); it was not written by "
                        "`hwslim train` or by hwslim.importing.data")
    if info.get("version") != DATA_VERSION:
        raise DataError(f"data record version {info.get('version')!r} is not supported (this hwslim reads "
                        f"{DATA_VERSION})")
    kind, size = info["kind"], int(info["input_size"])
    if kind == "synthetic":
        src: _Source = _SyntheticSource(size, info["synthetic_seed"], info["num_train_total"], info["num_val"],
                                        len(info["classes"]))  # the class count it was generated with
    elif kind in ("cifar10", "cifar100"):
        src = _CifarSource(kind, info["root"], size, download=False)
    elif kind == "imagefolder":
        if not Path(info["root"]).is_dir():
            raise DataError(f"the training data {info['root']} is gone; the search split lives there")
        src = _FolderSource(info["root"], size)
    else:
        raise DataError(f"unknown dataset kind {kind!r} in the checkpoint")
    if src.num_train() != info["num_train_total"] or list(src.classes) != list(info["classes"]):
        raise DataError(f"{info.get('root') or kind}: the dataset changed since training "
                        f"({src.num_train()} training images now, {info['num_train_total']} then); "
                        "the recorded search split no longer names the same images")
    return src


# -- the search split ---------------------------------------------------------------------
def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` training images, as sorted indices, drawn class-balanced and seeded.

    Every class gets ``n // classes`` images (``n % classes`` classes, drawn at random,
    one more); a class with fewer images gives all it has and the others make up the
    difference. Within a class the images are a seeded random draw.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    total = len(labels)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= total:
        raise DataError(f"--train-subset must be a whole number from 1 to the {total} training images, got {n!r}")
    g = torch.Generator().manual_seed(mix_seeds(seed, 4099))
    classes = torch.unique(labels)
    members = [(labels == c).nonzero().squeeze(1) for c in classes.tolist()]
    members = [m[torch.randperm(len(m), generator=g)] for m in members]
    quota = [0] * len(members)
    left = n
    open_ = [i for i in range(len(members)) if len(members[i])]
    while left and open_:  # fill evenly; classes that run out leave their share to the rest
        share, extra = divmod(left, len(open_))
        lucky = set(torch.randperm(len(open_), generator=g)[:extra].tolist())
        for j, i in enumerate(open_):
            take = min(share + (j in lucky), len(members[i]) - quota[i])
            quota[i] += take
            left -= take
        open_ = [i for i in open_ if quota[i] < len(members[i])]
    return torch.cat([m[:q] for m, q in zip(members, quota)]).sort().values


def default_search_size(num_train: int) -> int:
    """10% of the training set, at most 10,000 images (AutoSlim holds out a fixed slice)."""
    return min(10_000, max(1, num_train // 10))


def carve_search_split(num_train: int, search_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, search indices), both sorted; a seeded random partition of range(num_train)."""
    if not 0 <= search_size < num_train:
        raise DataError(f"search split of {search_size} images does not fit a training set of {num_train} "
                        "(it must leave training images)")
    perm = torch.randperm(num_train, generator=torch.Generator().manual_seed(mix_seeds(seed, 7919)))
    return perm[search_size:].sort().values, perm[:search_size].sort().values


def _data_info(src: _Source, spec_text: str, search_idx: torch.Tensor, search_seed: int) -> dict[str, Any]:
    return {"format": DATA_FORMAT, "version": DATA_VERSION, "spec": spec_text, "root": None, **src.info(),
            "search_seed": int(search_seed), "search_indices": [int(i) for i in search_idx]}


def synthetic_data_info(num_train: int = 2000, num_search: int = 500, seed: int = 0, input_size: int = 32,
                        num_val: int = 1000) -> dict[str, Any]:
    """The checkpoint ``data`` dict of a synthetic dataset, without training.

    For tests and tools that need a checkpoint quickly::

        >>> ckpt = Checkpoint(create_model("resnet20"), data=synthetic_data_info(2000, 500))
        >>> x, y = search_split(ckpt)      # 500 images, regenerated from the seed
    """
    src = _SyntheticSource(input_size, seed, num_train, num_val)
    _, search = carve_search_split(num_train, num_search, seed)
    return _data_info(src, f"synthetic:{num_train}", search, seed)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (0..255) or float (0..255) NCHW -> float32 normalized with per-channel mean/std (0..1 scale)."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - m) / s


def _data_dict(ckpt: Any) -> dict[str, Any]:
    return ckpt if isinstance(ckpt, dict) else getattr(ckpt, "data", None) or {}


def _check_max_images(max_images: Any) -> None:
    if max_images is None:
        return
    if isinstance(max_images, bool) or not isinstance(max_images, numbers.Integral) or max_images < 1:
        raise DataError(f"--max-images must be a whole number of at least 1, got {max_images!r} "
                        "(leave it out to use every image)")


def spread(n: int, k: int) -> torch.Tensor:
    """``min(k, n)`` indices spread evenly over ``range(n)``, in order: a fair sample of a split kept
    in index order (which for an ImageFolder is class by class).

    >>> spread(10, 4).tolist()
    [0, 2, 5, 7]
    """
    k = min(k, n)
    return torch.div(torch.arange(k) * n, k, rounding_mode="floor")


def search_split(ckpt: Any, device: str | torch.device = "cpu",
                 max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's held-out search split: (float32 NCHW normalized images, int64 labels).

    Exactly the training images recorded at training time (eval transform), in index
    order; ``max_images`` (at least 1; None: all) keeps that many spread evenly over the
    split (:func:`spread`), not the first ones: an ImageFolder lists its images class by
    class, so the first images of a split in index order are of the first classes only.
    ``ckpt`` is a :class:`hwslim.importing.checkpoint.Checkpoint` (or its ``data`` dict).
    """
    _check_max_images(max_images)
    info = _data_dict(ckpt)
    src = _source_from_info(info)
    idx = torch.as_tensor(info["search_indices"], dtype=torch.int64)
    if max_images is not None:
        idx = idx[spread(len(idx), max_images)]
    if len(idx) == 0:
        raise DataError("the checkpoint's search split is empty (trained with --search-size 0)")
    x, y = src.load("train", idx)
    return normalize(x.to(device), info["mean"], info["std"]), y.to(device)


def validation_split(ckpt: Any, device: str | torch.device = "cpu",
                     max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation (or test) images of the checkpoint's dataset, like :func:`search_split`.

    ``max_images`` (at least 1; None: all) keeps a seeded random subset (class-balanced in
    expectation), in index order.
    """
    _check_max_images(max_images)
    info = _data_dict(ckpt)
    src = _source_from_info(info)
    n = src.num_val()
    idx = torch.arange(n)
    if max_images is not None and max_images < n:
        g = torch.Generator().manual_seed(mix_seeds(info.get("search_seed", 0), 104729))
        idx = torch.randperm(n, generator=g)[:max_images].sort().values
    x, y = src.load("val", idx)
    return normalize(x.to(device), info["mean"], info["std"]), y.to(device)


# -- augmentation on tensors (runs where the data lives: GPU when training there) ----------
def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """CIFAR-style augmentation of a batch: zero-pad by ``pad`` (size/8), random crop, random h-flip.

    Every image gets its own crop offset and flip, drawn from ``generator`` (which must
    live on ``x``'s device). Returns a tensor like ``x`` (its memory is channels-last).
    """
    n, c, h, w = x.shape
    pad = max(1, h // 8) if pad is None else pad
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=x.device)
    flip = torch.rand(n, 1, generator=generator, device=x.device) < 0.5
    cols = torch.arange(w, device=x.device)[None]
    cols = torch.where(flip, w - 1 - cols, cols) + ox
    rows = torch.arange(h, device=x.device)[None] + oy
    n_idx = torch.arange(n, device=x.device)[:, None, None]
    out = xp[n_idx, :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2)


def random_resized_crop_flip(x: torch.Tensor, generator: torch.Generator, size: int | None = None,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Inception-style RandomResizedCrop + h-flip of a float batch, one affine warp per image."""
    n, c, h, w = x.shape
    size = size or h
    dev = x.device
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator, device=dev)
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, generator=generator,
                                                                                        device=dev)
    r = torch.exp(logr)
    sw = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    sh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - sw) * (2 * torch.rand(n, generator=generator, device=dev) - 1)
    cy = (1 - sh) * (2 * torch.rand(n, generator=generator, device=dev) - 1)
    flip = torch.where(torch.rand(n, generator=generator, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = sw * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = sh, cy
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# -- training data -------------------------------------------------------------------------
class TrainData:
    """The training side of a dataset: batches per epoch and rank, normalized, augmented, on device.

    Built by :func:`build_data`. ``info`` is the checkpoint's ``data`` dict. In memory
    (small inputs) the training images live on ``device`` as uint8 and are augmented
    there; otherwise a ``DataLoader`` decodes with RandomResizedCrop + flip.

    ``batches(epoch, batch_size, rank, world, seed)`` is a pure function of its
    arguments (the shuffling and the augmentation are seeded from ``seed`` and
    ``epoch``), so a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, source: _Source, info: dict[str, Any], train_idx: torch.Tensor,
                 device: str | torch.device = "cpu", workers: int = 4) -> None:
        self.source, self.info = source, info
        self.device = torch.device(device)
        self.train_idx = train_idx
        self.input_size = source.input_size
        self.mean, self.std = tuple(info["mean"]), tuple(info["std"])
        self.workers = workers
        self.in_memory = source.in_memory
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        if self.in_memory:
            if isinstance(source, _FolderSource) and source._pool is None:
                x, y = source.decode_all("train")
                x, y = x[train_idx], y[train_idx]
            else:
                x, y = source.load("train", train_idx)
            self.images, self.labels = x.to(self.device), y.to(self.device)

    def __len__(self) -> int:
        return len(self.train_idx)

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        """Steps per epoch with a per-rank batch of ``batch_size`` (the last partial batch is dropped)."""
        return (len(self) // world) // batch_size

    def _sampler(self, epoch: int, rank: int, world: int, seed: int):
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(len(self)), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        return sampler

    def batches(self, epoch: int, batch_size: int, rank: int = 0, world: int = 1,
                seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's (images float32 NCHW normalized, labels) for one epoch."""
        sampler = self._sampler(epoch, rank, world, seed)
        steps = self.steps_per_epoch(batch_size, world)
        if self.in_memory:
            order = torch.as_tensor(list(iter(sampler)), dtype=torch.int64, device=self.device)
            gen = torch.Generator(device=self.device).manual_seed(mix_seeds(seed, epoch, rank, 31))
            small = self.input_size <= SMALL_INPUT
            for s in range(steps):
                idx = order[s * batch_size:(s + 1) * batch_size]
                x = self.images[idx]
                x = crop_flip(x, gen) if small else random_resized_crop_flip(x, gen)
                yield normalize(x, self.mean, self.std), self.labels[idx]
            return
        yield from self._stream(sampler, steps, batch_size, epoch, seed, rank)

    def _stream(self, sampler, steps: int, batch_size: int, epoch: int, seed: int,
                rank: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torchvision.transforms import v2 as T

        assert isinstance(self.source, _FolderSource), "streaming needs an ImageFolder source"
        tf = T.Compose([T.RandomResizedCrop(self.input_size, antialias=True), T.RandomHorizontalFlip()])
        ds = _StreamDataset(self.source.samples("train"), self.train_idx.tolist(), tf, mix_seeds(seed, epoch, 37))
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda", drop_last=True,
                                             persistent_workers=False)
        for s, (x, y) in enumerate(loader):
            if s >= steps:
                break
            x = x.to(self.device, non_blocking=True)
            yield normalize(x, self.mean, self.std), y.to(self.device, non_blocking=True)

    def calibration_images(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` training images (not the search split) with the eval transform, normalized, for BN recalibration."""
        g = torch.Generator().manual_seed(mix_seeds(seed, 271))
        pick = torch.randperm(len(self), generator=g)[: min(n, len(self))].sort().values
        if self.images is not None:
            x = self.images[pick.to(self.device)]
        else:
            x = self.source.load("train", self.train_idx[pick])[0].to(self.device)
        return normalize(x, self.mean, self.std)


class _StreamDataset(torch.utils.data.Dataset):
    """Decode + augment one training image. Each (epoch, image) has its own seed, so the
    crops do not depend on the number of workers, and a resumed run sees the same ones."""

    def __init__(self, samples: list[tuple[str, int]], indices: list[int], transform, seed: int) -> None:
        self.samples, self.indices, self.transform, self.seed = samples, indices, transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[self.indices[i]]
        img = _read_rgb(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seeds(self.seed, i))
            return self.transform(img), label


def build_data(spec: str | DataSpec, input_size: int, *, search_size: int | None = None, seed: int = 0,
               download: bool = False, device: str | torch.device = "cpu", workers: int = 4,
               num_val: int | None = None, train_subset: int | None = None) -> TrainData:
    """Open ``spec``, carve the search split (seeded by ``seed``) and prepare the training set.

    ``train_subset`` N: use only N training images (:func:`balanced_subset`, seeded by
    ``seed``), search split included; any source. ``search_size`` defaults to
    :func:`default_search_size` of the images used; 0 holds nothing out. The returned
    :class:`TrainData`'s ``info`` is the checkpoint's ``data`` dict.
    """
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    src = _open_source(spec, input_size, seed=seed, download=download, num_val=num_val)
    pool = None
    if train_subset is not None:
        pool = balanced_subset(src.train_labels(), train_subset, seed)
        if isinstance(src, _FolderSource):
            src.restrict(pool)
    n = src.num_train() if pool is None else len(pool)
    size = default_search_size(n) if search_size is None else int(search_size)
    train_idx, search_idx = carve_search_split(n, size, seed)
    if pool is not None:  # positions in the subset -> indices into the whole training set
        train_idx, search_idx = pool[train_idx], pool[search_idx]
    info = _data_info(src, spec.text, search_idx, seed)
    if pool is not None:
        info.update(train_subset=int(train_subset), train_subset_seed=int(seed),
                    train_subset_indices=[int(i) for i in pool])
    info["num_train"] = len(train_idx)  # images trained on (the search split and any unused ones excluded)
    return TrainData(src, info, train_idx, device=device, workers=workers)

