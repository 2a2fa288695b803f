"""Scoring channel configs on the search split, fast.

Every greedy step scores one candidate per unit: the current config with that unit
one grid step narrower. A candidate that narrows unit ``u`` to ``w`` channels computes
exactly what the current config computes up to the first node that *mixes* ``u``'s
channels (an operator with :attr:`~hwslim.ops.Op.mixes`: a dense conv, a linear layer,
an SE block reading ``u``); before that, every tensor of unit ``u`` is the current one
cut to its first ``w`` channels (the kept channels of ``u``'s part, in a
concatenation), because conv outputs, BatchNorm (its statistics are per channel),
activations, depthwise and grouped convs, adds, concatenation and pooling all act
channel by channel (or group by group). So :class:`StepEvaluator`
(``mode="fast"``) advances one cached prefix of the current config in node order,
slices it for each candidate and runs only the rest. Sharing the prefix's BatchNorm
statistics is exact for the same reason. ``mode="reference"`` runs a plain full
forward pass per candidate; both give the same scores up to float rounding (a sliced
conv output against a narrower conv).

BatchNorm (``bn=``):

* ``"recal"``: reset the statistics, accumulate an exact average over the split's
  chunks in train mode, then score in eval mode (two passes);
* ``"batch"``: score in train-mode BN, each fixed chunk normalized by its own batch
  statistics (one pass; chunks are fixed, so scores are deterministic).

The supernet's own running statistics are restored after every call.

``kernels="triton"`` (CUDA only) scores a whole step with the fused multi-config Triton
kernels of :mod:`hwslim.kernels` (one pass for all candidates, shared prefix once);
PyTorch (``"torch"``) is the default and the reference.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from hwslim.config import ChannelConfig
from hwslim.evaluate import preserved_bn_stats
from hwslim.graph import INPUT, run_graph
from hwslim.slimmable import BN_TYPES
from hwslim.supernet import SlimmableNet

BN_MODES = ("recal", "batch")
EVAL_MODES = ("fast", "reference")
KERNELS = ("torch", "triton")


@dataclass(frozen=True)
class Score:
    """Search-split accuracy (0..1) and mean cross-entropy (a tie-breaker)."""

    acc: float
    loss: float


class StepEvaluator:
    """Scores configs of ``model`` on fixed ``images``/``labels`` (held in memory on their device)."""

    def __init__(self, model: SlimmableNet, images: torch.Tensor, labels: torch.Tensor, *, bn: str = "recal",
                 mode: str = "fast", batch_size: int = 250, kernels: str = "torch") -> None:
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        if kernels == "triton":
            from hwslim import kernels as _k

            _k.check_device(images.device)
            why = _k.unsupported(model)
            if why is not None:  # the multi-config pass runs whole steps: the whole model falls back
                warnings.warn(f"the Triton kernels cannot compute {model.name} ({why}); scoring with PyTorch",
                              stacklevel=2)
                kernels = "torch"
        self.kernels = kernels
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
        if mode not in EVAL_MODES:
            raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")
        self.model, self.bn, self.mode = model, bn, mode
        self.chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        self.label_chunks = [labels[i:i + batch_size] for i in range(0, len(labels), batch_size)]
        self.n = len(labels)
        nodes = model.nodes
        self._start = {u: mixing_start(model, u) for u in model.units}
        self._bn_at = {i: bns for i, n in enumerate(nodes)
                       if (bns := [m for m in (model.layers[n.name].modules() if n.name in model.layers else ())
                                   if isinstance(m, BN_TYPES)])}
        self._free_after = model._free_after
        self.forward_nodes = 0  # nodes executed per image, summed: a measure of work done

    # -- helpers ----------------------------------------------------------------------------
    def _set_modes(self, bn_train: bool) -> None:
        self.model.eval()
        if bn_train:
            for bns in self._bn_at.values():
                for m in bns:
                    m.train()

    def _reset_bn(self, start: int, stop: int) -> None:
        for i in range(start, stop):
            for m in self._bn_at.get(i, ()):
                m.reset_running_stats()
                m.momentum = None

    def _run(self, env: dict, start: int = 0, stop: int | None = None):
        """Run nodes[start:stop] from the live tensors ``env``: logits, or the env at ``stop``."""
        model = self.model
        self.forward_nodes += (len(model.nodes) if stop is None else stop) - start
        return run_graph(model.nodes, model._layer, None, start=start, env=env, stop=stop,
                         free_after=self._free_after)

    def _score_logits(self, logits: Sequence[torch.Tensor]) -> Score:
        correct, loss = 0, 0.0
        for out, y in zip(logits, self.label_chunks):
            correct += int((out.argmax(1) == y).sum())
            loss += float(F.cross_entropy(out.float(), y, reduction="sum"))
        return Score(correct / self.n, loss / self.n)

    def _suffix_score(self, start: int, train_envs: list, eval_envs: list) -> Score:
        """Score the model's current config from node ``start`` on, given the inputs there."""
        if self.bn == "batch":
            self._set_modes(bn_train=True)
            return self._score_logits([self._run(env, start) for env in train_envs])
        self._reset_bn(start, len(self.model.nodes))
        self._set_modes(bn_train=True)
        for env in train_envs:
            self._run(env, start)
        self._set_modes(bn_train=False)
        return self._score_logits([self._run(env, start) for env in eval_envs])

    def _narrow(self, envs: list, unit: str, width: int, current: ChannelConfig) -> list:
        """The live tensors of the current config with ``unit`` cut to its first ``width`` channels."""
        cut: dict[str, torch.Tensor | int] = {}
        for name in envs[0] if envs else ():
            lay, k = self.model.tensor_layout(name), self.model.per_channel(name)
            if unit not in lay:
                continue
            if len(lay) == 1:
                cut[name] = width * k  # a prefix (features of the kept channels, if flattened)
                continue
            parts, off = [], 0
            for r in lay:
                w = r if isinstance(r, int) else current.widths[r]
                parts.append(torch.arange(off * k, (off + (width if r == unit else w)) * k))
                off += w
            cut[name] = torch.cat(parts)
        out = []
        for env in envs:
            e = dict(env)
            for name, idx in cut.items():
                e[name] = env[name][:, :idx] if isinstance(idx, int) else env[name].index_select(1, idx.to(env[name].device))
            out.append(e)
        return out

    # -- public -------------------------------------------------------------------------------
    @torch.no_grad()
    def _triton_scores(self, configs: Sequence[ChannelConfig]) -> list[Score]:
        from hwslim.kernels import step_logits

        outs = step_logits(self.model, self.chunks, list(configs), bn=self.bn)
        return [self._score_logits([o[k] for o in outs]) for k in range(len(configs))]

    @torch.no_grad()
    def score(self, config: ChannelConfig) -> Score:
        """Score one config with a full pass."""
        if self.kernels == "triton":
            return self._triton_scores([config])[0]
        model = self.model
        with model.using(config), preserved_bn_stats(model):
            envs = [{INPUT: x} for x in self.chunks]
            return self._suffix_score(0, envs, envs)

    @torch.no_grad()
    def score_candidates(self, current: ChannelConfig, candidates: Sequence[tuple[str, ChannelConfig]]) -> list[Score]:
        """Scores of ``candidates`` (unit changed, config), each differing from ``current`` in that unit."""
        if self.kernels == "triton":
            return self._triton_scores([cfg for _, cfg in candidates])
        if self.mode == "reference":
            return [self.score(cfg) for _, cfg in candidates]
        model = self.model
        was_training = model.training
        order = sorted(range(len(candidates)), key=lambda k: self._start[candidates[k][0]])
        scores: list[Score | None] = [None] * len(candidates)
        with preserved_bn_stats(model):
            train_envs = [{INPUT: x} for x in self.chunks]
            eval_envs = train_envs
            pos = 0
            for k in order:
                unit, cfg = candidates[k]
                start = self._start[unit]
                if start > pos:  # advance the shared prefix of the current config to `start`
                    with model.using(current):
                        self._set_modes(bn_train=True)
                        if self.bn == "recal":
                            self._reset_bn(pos, start)
                        train_envs = [self._run(env, pos, start) for env in train_envs]
                        if self.bn == "recal":
                            self._set_modes(bn_train=False)
                            eval_envs = [self._run(env, pos, start) for env in eval_envs]
                        else:
                            eval_envs = train_envs
                    pos = start
                width = cfg.widths[unit]
                with model.using(cfg):
                    scores[k] = self._suffix_score(start, self._narrow(train_envs, unit, width, current),
                                                   self._narrow(eval_envs, unit, width, current))
        model.train(was_training)
        return scores  # type: ignore[return-value]


def mixing_start(model: SlimmableNet, unit: str) -> int:
    """Index of the first node whose outputs mix the channels of ``unit`` (or whose inner width it is)."""
    for i, n in enumerate(model.nodes):
        if n.mid == unit:
            return i
        if n.op.mixes and any(unit in model.tensor_layout(t) for t in n.inputs):
            return i
    raise ValueError(f"no node reads unit {unit!r}")
