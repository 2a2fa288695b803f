"""``ChannelConfig``: the one description of a slimmed network.

A config names the supernet it belongs to (model name and width multiplier), the input
size, and the width of every channel unit. The same JSON file is the search's output,
the export's input and part of a checkpoint. Keys are sorted and the file carries a
schema version, so configs diff cleanly and old files are recognised.

Example::

    >>> cfg = ChannelConfig("mobilenet_v2", 1.0, 224, {"stem": 16, "head": 1280})
    >>> ChannelConfig.from_json(cfg.to_json()) == cfg
    True

``meta`` carries provenance and predictions (what produced the file, predicted
latency, search accuracy); it round-trips but does not take part in equality.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hwslim.core.outputs import refuse_directory, temporary_path
from hwslim.core import jsonio
from hwslim.core.errors import ConfigError, OutputExistsError

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ChannelConfig:
    model: str
    width_mult: float
    input_size: int
    widths: Mapping[str, int]
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", {k: int(self.widths[k]) for k in sorted(self.widths)})
        object.__setattr__(self, "meta", dict(self.meta))
        object.__setattr__(self, "width_mult", float(self.width_mult))
        object.__setattr__(self, "input_size", int(self.input_size))

    def replace(self, **widths: int) -> "ChannelConfig":
        """A copy with some unit widths changed (``cfg.replace(stem=16)``)."""
        return self.with_widths({**self.widths, **widths})

    def with_widths(self, widths: Mapping[str, int]) -> "ChannelConfig":
        return ChannelConfig(self.model, self.width_mult, self.input_size, widths, {})

    def with_meta(self, **meta: Any) -> "ChannelConfig":
        return ChannelConfig(self.model, self.width_mult, self.input_size, self.widths, {**self.meta, **meta})

    # -- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "width_mult": self.width_mult,
            "input_size": self.input_size,
            "widths": dict(self.widths),
            "meta": dict(self.meta),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "ChannelConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: not a channel config (expected a JSON object)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"{source}: unsupported channel-config schema_version {version!r} "
                f"(this hwslim reads version {SCHEMA_VERSION})"
            )
        missing = [k for k in ("model", "width_mult", "input_size", "widths") if k not in data]
        if missing:
            raise ConfigError(f"{source}: channel config lacks {', '.join(missing)}")
        if not isinstance(data["model"], str):
            raise ConfigError(f"{source}: 'model' must be a model name")
        wm, size = data["width_mult"], data["input_size"]
        if isinstance(wm, bool) or not isinstance(wm, (int, float)) or not wm > 0:
            raise ConfigError(f"{source}: 'width_mult' must be a positive number, got {wm!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{source}: 'input_size' must be a positive whole number, got {size!r}")
        widths = data["widths"]
        if not isinstance(widths, Mapping) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in widths.values()
        ):
            raise ConfigError(f"{source}: 'widths' must map unit names to positive integer channel counts")
        return cls(data["model"], data["width_mult"], data["input_size"], widths, data.get("meta") or {})

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> "ChannelConfig":
        try:
            data = jsonio.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except ValueError as e:  # too deep, or bytes that are not UTF-8
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(data, source)

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write atomically; refuse to overwrite an existing file unless ``force``."""
        path = Path(path)
        if path.exists() and not force:
            raise OutputExistsError(f"{path} exists; pass --force to overwrite it")
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ChannelConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        return cls.from_json(text, source=str(path))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    refuse_directory(path)  # named as such, not as a failed rename of its temporary
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: the old file stays, the temporary goes
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
