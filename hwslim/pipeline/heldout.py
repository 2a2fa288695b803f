"""Held-out accuracy of searched configs and of exported models (``hwslim eval``).

The checkpoint's data record names the held-out split; configs are scored after BN
recalibration on the search split exactly as ``hwslim export`` recalibrates, and an
exported ONNX model is scored with ONNX Runtime under the export's session settings.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

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
    check_classifier(len(net.outputs), str(ckpt.path or net.name))
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
    logits = ort_outputs(path, images.float().contiguous(), batch, dynamic)[0][:n]
    return float((logits.argmax(1) == labels).float().mean()) if n else 0.0


def evaluate_exported(models: list[tuple[str, Path, dict]], load: Callable[[str], Any], *,
                      checkpoint: str | None = None, max_images: int | None = None,
                      progress: bool = False) -> tuple[list[dict], dict[str, dict]]:
    """Top-1 (%) and costs of exported ONNX models, as they are (BN recalibrated and folded at
    export), with ONNX Runtime on the held-out split of the checkpoint their metadata names.

    ``models`` are ``(as given, path, metadata)`` (:func:`hwslim.latency.verify.resolve_model`);
    ``load`` loads a checkpoint by path (the caller's cache); ``checkpoint`` overrides the one
    the metadata names. Returns ``(rows, evaluated_on)``, keyed by the model as given.
    """
    for given, path, meta in models:  # every refusal before the progress bar starts
        check_exported(path, meta, load, checkpoint)
    bar = None
    if models and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(models), desc="scoring ONNX models", unit="model", dynamic_ncols=True)
    rows, evaluated_on = [], {}
    for given, path, meta in models:
        row, evaluated_on[str(given)] = _evaluate_one(given, path, meta, load, checkpoint, max_images)
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows, evaluated_on


def check_classifier(outputs: int, what: str) -> None:
    """Refuse (ConfigError, one line) a model with several outputs: held-out top-1 scores a
    classifier's one output of logits; a detector or segmenter is scored by the user's own
    ``score_fn`` (:func:`hwslim.search_configs`)."""
    from hwslim.core.errors import ConfigError

    if outputs > 1:
        raise ConfigError(f"{what} has {outputs} outputs: hwslim eval scores a classifier's top-1 on one output of "
                          "logits; score a detector or segmenter with your own metric (hwslim.search_configs "
                          "score_fn=..., or the exported model in your evaluation code)")


def check_exported(path: Path, meta: dict, load: Callable[[str], Any], checkpoint: str | None):
    """Refuse (one line) an exported model that cannot be scored: no config or checkpoint in its
    metadata, a config that does not fit the checkpoint's supernet or data size, a garbled batch.
    Returns ``(config, checkpoint path, checkpoint)``."""
    from hwslim.core.errors import ConfigError
    from hwslim.latency.verify import metadata_int
    from hwslim.runtimes.onnx_file import config_from_metadata, metadata_outputs

    from hwslim.core.resources import check_inference

    check_classifier(len(metadata_outputs(meta, str(path))), str(path))
    cfg = config_from_metadata(meta, str(path))
    batch = metadata_int(meta, "batch", str(path), 1)
    ck = checkpoint or meta.get("checkpoint")
    if not ck:
        raise ConfigError(f"{path} names no checkpoint in its metadata; give --checkpoint CKPT")
    ckpt = load(ck)
    if int(ckpt.data.get("input_size", cfg.input_size)) != cfg.input_size:
        raise ConfigError(f"{path} takes {cfg.input_size}px inputs but {ck}'s data is {ckpt.data['input_size']}px")
    ckpt.model.validate(cfg)
    check_inference(ckpt.model, cfg, batch=batch, input_size=cfg.input_size,  # the batch is allocated as padding
                    what=f"scoring {path} (batch {batch:,} at {cfg.input_size}x{cfg.input_size} px)")
    return cfg, ck, ckpt


def _evaluate_one(given: str, path: Path, meta: dict, load: Callable[[str], Any], checkpoint: str | None,
                  max_images: int | None) -> tuple[dict, dict]:
    from hwslim.core.costs import model_costs
    from hwslim.latency.verify import metadata_int
    from hwslim.runtimes.onnx_file import sha256_file

    cfg, ck, ckpt = check_exported(path, meta, load, checkpoint)
    if not checkpoint and meta.get("checkpoint_sha256") and sha256_file(ck) != meta["checkpoint_sha256"]:
        print(f"note: {ck} changed since {path} was exported; its data record is used for the held-out images",
              file=sys.stderr)
    images, labels, on = heldout_split(ckpt, max_images)
    on["bn"] = meta.get("bn_statistics", "as exported")
    top1 = onnx_top1(path, images, labels, batch=metadata_int(meta, "batch", str(path), 1),
                     dynamic=meta.get("dynamic_batch") == "true")
    costs = model_costs(ckpt.model, cfg)
    return {"model": str(given), "kind": "onnx", "top1": round(100 * top1, 2),
            "search_acc": percent(cfg.meta.get("search_acc")), "latency_ms": cfg.meta.get("latency_ms"),
            "params": costs.params, "macs": costs.macs, "checkpoint": ck}, on


def percent(v) -> float | str:
    """A 0..1 fraction as a percentage with two decimals; ``""`` for none (a blank table cell)."""
    return round(100 * float(v), 2) if v is not None else ""
