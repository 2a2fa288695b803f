"""Supernet checkpoints: everything needed to rebuild and use a trained supernet.

A checkpoint is a plain dict saved with ``torch.save`` and read with
``weights_only=True`` (no pickled code). Keys:

* ``format`` = ``"hwslim-checkpoint"``, ``version`` = 1, ``hwslim_version``;
* ``model``: ``graph`` (the model as data: :func:`hwslim.core.graph.graph_to_dict`, from which
  it is rebuilt; no zoo name is needed), plus ``name``, ``width_mult``, ``input_size``,
  ``num_classes``, ``divisor`` and ``units`` (unit -> grid, checked on load); a
  checkpoint without ``graph`` (older hwslim) is rebuilt from the zoo by name;
* ``state_dict``: the supernet's weights;
* ``data``: how the data was built, including the held-out **search split** (indices
  into the training set) so the search scores exactly those images;
* ``train_args``: the training arguments; ``epoch``: epochs completed;
* ``training_state`` (optional): optimizer, scheduler, sampler and RNG state for resume.

Writes are atomic (temporary file, then rename), so an interrupted save never leaves
a half-written checkpoint where the last good one was.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hwslim.core.outputs import refuse_directory, temporary_path
from hwslim.core.version import __version__
from hwslim.core.config import ChannelConfig
from hwslim.core.errors import CheckpointError
from hwslim.core.supernet import SlimmableNet

FORMAT = "hwslim-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    model: SlimmableNet
    data: dict[str, Any] = field(default_factory=dict)
    train_args: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    training_state: dict[str, Any] | None = None
    path: Path | None = None

    def check_config(self, config: ChannelConfig) -> ChannelConfig:
        """:meth:`SlimmableNet.validate` ``config`` for this checkpoint's supernet. Where it does not
        fit and the config records another checkpoint (``checkpoint_sha256``, written by the search),
        the one line names that checkpoint instead of the first unit off the grid: the likely
        mistake is the pairing, not the config."""
        from hwslim.core.errors import ConfigError

        try:
            return self.model.validate(config)
        except ConfigError:
            sha = config.meta.get("checkpoint_sha256")
            if not isinstance(sha, str) or not sha or self.path is None:
                raise
            from hwslim.runtimes.onnx_file import sha256_file

            if sha256_file(self.path) == sha:
                raise
            name = Path(str(config.meta.get("checkpoint") or "?")).name
            raise ConfigError(f"this config was searched on checkpoint {name}, sha256 {sha[:12]}, not on "
                              f"{self.path}: give that checkpoint, or search this one") from None


def model_info(model: SlimmableNet) -> dict[str, Any]:
    return {
        "name": model.name,
        "width_mult": model.width_mult,
        "input_size": model.input_size,
        "num_classes": model.num_classes,
        "divisor": model.divisor,
        "units": {u: list(unit.grid) for u, unit in model.units.items()},
        "graph": model.graph_dict(),  # the model as data: rebuilt from this, not from the zoo
    }


def _read_payload(path: Path, map_location: str | torch.device = "cpu") -> dict:
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # truncated zip, pickle with code, random bytes...
        # PyTorch's own message suggests weights_only=False, which would run code from the
        # file: do not echo it.
        raise CheckpointError(f"{path} is not a readable hwslim checkpoint (truncated, corrupt or not a "
                              "PyTorch file); re-run `hwslim train` or point to another file") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an hwslim checkpoint (no '{FORMAT}' marker); "
                              "give a file written by `hwslim train`")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r} is not supported "
                              f"(this hwslim reads version {VERSION})")
    _check_payload(payload, path)
    return payload


def _graph_of(info: dict) -> dict:
    """The model's graph: stored (current checkpoints), else written by the zoo (older ones)."""
    if isinstance(info.get("graph"), dict):
        return info["graph"]
    from hwslim.models import create_model

    with torch.device("meta"):
        net = create_model(info["name"], width_mult=info["width_mult"], input_size=info["input_size"],
                           num_classes=info["num_classes"], divisor=info["divisor"])
    return net.graph_dict()


def read_graph(path: str | os.PathLike) -> dict:
    """The graph a checkpoint describes (no weights loaded into a model)."""
    path = Path(path)
    info = _read_payload(path)["model"]
    try:
        return _graph_of(info)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model description is unusable ({type(e).__name__}: {e})") from None


def save_checkpoint(path: str | os.PathLike, model: SlimmableNet, *, data: dict | None = None,
                    train_args: dict | None = None, epoch: int = 0,
                    training_state: dict | None = None) -> Path:
    """Save atomically. The model's weights are saved as they are (any device)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "hwslim_version": __version__,
        "model": model_info(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data": data or {},
        "train_args": train_args or {},
        "epoch": int(epoch),
    }
    if training_state is not None:
        payload["training_state"] = training_state
    refuse_directory(path)  # named as such, not as a failed rename of its temporary
    tmp = temporary_path(path)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except RuntimeError as e:  # torch reports a failed write (a full disk) as a RuntimeError, not OSError
        raise CheckpointError(f"cannot write {path} (a full disk or an I/O error: {str(e).splitlines()[0][:80]}); "
                              "the previous checkpoint is intact") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _check_payload(payload: dict, path: Path) -> None:
    """Refuse (CheckpointError, one line) a payload whose fields are missing or of the wrong kind."""
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: {problem}; it was not written by `hwslim train` (or was edited)")

    def whole(v, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    info = payload.get("model")
    if not isinstance(info, dict):
        raise bad("the checkpoint has no 'model' description" if info is None else "its 'model' is not a dict")
    if not isinstance(info.get("name"), str) or not info["name"]:
        raise bad(f"model name {info.get('name')!r} is not a name")
    wm = info.get("width_mult")
    if isinstance(wm, bool) or not isinstance(wm, (int, float)) or not 0 < wm < float("inf"):
        raise bad(f"model width_mult {wm!r} is not a positive number")
    for key in ("input_size", "num_classes", "divisor"):
        if not whole(info.get(key), 1):
            raise bad(f"model {key} {info.get(key)!r} is not a whole number of at least 1")
    if "units" in info and not isinstance(info["units"], dict):
        raise bad("model units is not a dict")
    if not isinstance(payload.get("state_dict"), dict):
        raise bad("it holds no weights ('state_dict')")
    for key in ("data", "train_args"):
        if key in payload and not isinstance(payload[key], dict):
            raise bad(f"its {key!r} is not a dict")
    if "epoch" in payload and not whole(payload["epoch"], 0):
        raise bad(f"epoch {payload['epoch']!r} is not a whole number")
    if payload.get("training_state") is not None and not isinstance(payload["training_state"], dict):
        raise bad("its 'training_state' is not a dict")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and rebuild the supernet; a missing, truncated or foreign file raises CheckpointError."""
    from hwslim.core.graph import GraphFormatError

    path = Path(path)
    payload = _read_payload(path, map_location)
    info = payload["model"]
    try:
        model = SlimmableNet.from_graph(_graph_of(info))
    except (GraphFormatError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model description is unusable ({type(e).__name__}: {e})") from None
    grids = {u: list(unit.grid) for u, unit in model.units.items()}
    if grids != info.get("units", grids):
        raise CheckpointError(f"{path}: its unit grid differs from this hwslim's {info['name']}; "
                              "it was written by an incompatible version")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {info['name']} "
                              f"({str(e).splitlines()[0][:120]})") from None
    model.to(map_location)
    return Checkpoint(model, payload.get("data", {}), payload.get("train_args", {}), payload.get("epoch", 0),
                      payload.get("training_state"), path)


def finetuned_config(ckpt: Checkpoint) -> ChannelConfig | None:
    """The config a checkpoint written by ``hwslim finetune`` was trained at (None for a supernet).

    Only that config's weights in such a checkpoint are the finetuned network; ``export`` and
    ``eval`` take it as the default config.
    """
    record = (ckpt.train_args or {}).get("finetune")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return None
    return ChannelConfig.from_dict(record["config"], source=f"{ckpt.path or 'checkpoint'} (finetuned config)")
