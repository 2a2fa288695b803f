"""Held-out accuracy of searched configs and of exported models (``hwslim eval``).

The checkpoint's data record names the held-out split; configs are scored after BN
recalibration on the search split exactly as ``hwslim export`` recalibrates, and an
exported ONNX model is scored with ONNX Runtime under the export's session settings.
"""
from __future__ import annotations

import torch

from hwslim.core.config import ChannelConfig


# -- held-out accuracy of searched configs and exported models (``hwslim eval``) ---------------------
EXPORT_CALIB_BATCH = 128  # hwslim.export.exporter recalibrates BN in batches of 128: the same statistics here


def heldout_split(ckpt, max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The validation (or test) images the checkpoint's data record names, and what they are."""
    from hwslim.importing.data import validation_split

    images, labels = validation_split(ckpt, max_images=max_images)
    return images, labels, {"split": ckpt.data.get("val_split", "val"), "images": len(labels)}


def evaluate_configs_heldout(ckpt, configs: list[tuple[str, ChannelConfig]], *, calib_images: int = 512,
                             max_images: int | None = None, progress: bool = False) -> tuple[list[dict], dict]:
    """Top-1 (%) of each config of ``ckpt``'s supernet on its held-out split, after BN
    recalibration at the config on ``calib_images`` images of the search split, exactly as
    ``hwslim export`` recalibrates before exporting (0: the supernet's statistics).

    Returns ``(rows, evaluated_on)``; the supernet is left as it was.
    """
    from hwslim.export.exporter import checkpoint_images
    from hwslim.training.train import evaluate_configs

    net = ckpt.model
    for _, cfg in configs:
        net.validate(cfg)
    images, labels, on = heldout_split(ckpt, max_images)
    calib, why = checkpoint_images(ckpt, "search", calib_images)
    on["bn"] = f"recalibrated per config on {why}" if calib is not None else f"the supernet's statistics ({why})"
    on["calib_images"] = 0 if calib is None else len(calib)
    rows = evaluate_configs(net, configs, images, labels, calib, progress=progress,
                            desc=f"scoring on {len(labels):,} {on['split']} images", calib_batch_size=EXPORT_CALIB_BATCH)
    return rows, on


def onnx_top1(path, images: torch.Tensor, labels: torch.Tensor, batch: int = 1, dynamic: bool = False) -> float:
    """Top-1 (0..1) of an ONNX model with ONNX Runtime (``hwslim.export.exporter``'s session settings);
    a fixed batch larger than the images left over is padded, and the padding not scored."""
    from hwslim.runtimes.onnx_file import ort_outputs

    n = len(images)
    pad = 0 if dynamic else (-n) % batch
    if pad:
        images = torch.cat([images, images[:1].expand(pad, *images.shape[1:])])
    logits = ort_outputs(path, images.float().contiguous(), batch, dynamic)[:n]
    return float((logits.argmax(1) == labels).float().mean()) if n else 0.0
