"""A synthetic detection set: filled shapes on textured backgrounds, boxes known exactly.

Deterministic by seed: image ``i`` of a split is drawn from its own generator seeded with
``(seed, split, i)``, so a subset or a longer set repeats the same images. Each image has
1 to 4 objects of :data:`CLASSES` (random size, colour and position, never overlapping)
on a background of noise, stripes or a gradient; a box is the drawn mask's exact extent
(pixels, ``x1, y1, x2, y2`` with ``x2, y2`` exclusive).

    >>> images, targets = make_split(8, size=160, seed=0, split="train")   # doctest: +SKIP
    >>> images.shape, targets[0]["boxes"], targets[0]["labels"]          # uint8 (8, 3, 160, 160)
"""
from __future__ import annotations

import numpy as np
import torch

CLASSES = ("circle", "square", "triangle", "cross")
SPLITS = {"train": 0, "search": 1, "val": 2}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 1]: noise, stripes or a gradient, with some noise on top."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(3)
    c0, c1 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    if kind == 0:
        t = rng.random((size, size), dtype=np.float32)
    elif kind == 1:
        angle, freq = rng.random() * np.pi, rng.uniform(3, 12)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    else:
        angle = rng.random() * 2 * np.pi
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    return np.clip(img + rng.normal(0, 0.05, img.shape).astype(np.float32), 0, 1)


def _mask(cls: int, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """The filled shape ``cls`` of half-size ``r`` centred at (cx, cy), as a boolean (size, size) mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if CLASSES[cls] == "circle":
        return dx * dx + dy * dy <= r * r
    if CLASSES[cls] == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if CLASSES[cls] == "triangle":  # apex up, base at cy + r
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    arm = r / 3  # cross
    return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))


def make_image(rng: np.random.Generator, size: int, classes: int = len(CLASSES)
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image (uint8 HWC), its boxes (n, 4 float, pixel xyxy) and labels (n,)."""
    img = _background(rng, size)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _try in range(20):  # place without overlapping a box already drawn
            r = rng.uniform(0.06, 0.2) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            box = np.array([cx - r, cy - r, cx + r, cy + r])
            if all(box[0] >= b[2] or box[2] <= b[0] or box[1] >= b[3] or box[3] <= b[1] for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(classes))
        m = _mask(cls, size, cx, cy, r)
        ys, xs = np.nonzero(m)
        img[m] = rng.random(3, dtype=np.float32)
        boxes.append(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32))
        labels.append(cls)
    return (img * 255).round().astype(np.uint8), np.stack(boxes), np.array(labels, dtype=np.int64)


def make_split(n: int, size: int = 160, seed: int = 0, split: str = "train", classes: int = len(CLASSES)
               ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """``n`` images (uint8 NCHW) and their targets ``[{"boxes": (k, 4) xyxy pixels, "labels": (k,)}]``."""
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    targets = []
    for i in range(n):
        img, boxes, labels = make_image(np.random.default_rng([seed, SPLITS[split], i]), size, classes)
        images[i] = torch.from_numpy(img).permute(2, 0, 1)
        targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)})
    return images, targets
