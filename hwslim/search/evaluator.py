"""Scoring channel configs on the search split, fast.

Every greedy step scores one candidate per unit: the current config with that unit
one grid step narrower. A candidate that narrows unit ``u`` to ``w`` channels computes
exactly what the current config computes up to the first node that *mixes* ``u``'s
channels (an operator with :attr:`~hwslim.core.ops.Op.mixes`: a dense conv, a linear layer,
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

Wider candidates (the budget filling's grow-back, :func:`hwslim.search.greedy.fill_budget`)
share the prefix too: it runs every unit a candidate still to come changes at the
widest width any of them asks for (the *envelope*), and each candidate slices its own
widths out of it. A unit goes back to its current width where its channels are first
mixed, which no candidate that changes it has not reached yet. Any candidate may
change several units; the current config itself is a candidate too (it changes none).

BatchNorm (``bn=``):

* ``"recal"``: reset the statistics, accumulate an exact average over the
  calibration chunks in train mode, then score in eval mode (two passes). The
  calibration images are the whole split, or ``calib_images`` of them spread evenly
  over it;
* ``"batch"``: score in train-mode BN, each fixed chunk normalized by its own batch
  statistics (one pass; chunks are fixed, so scores are deterministic).

Chunks are strided over the split (chunk ``c`` holds images ``c, c + C, ...``): a split
stored in index order often lists the images of one class together, and a chunk of
consecutive images would then calibrate on a few classes.

The supernet's own running statistics are restored after every call.

:class:`Halving` (successive halving) scores every candidate of a step on a small
evenly spread subset of the split and only the best few on the whole split, ranked by
the caller's own rule.

``kernels="triton"`` (CUDA only) scores a whole step with the fused multi-config Triton
kernels of :mod:`hwslim.kernels` (one pass for all candidates, shared prefix once);
PyTorch (``"torch"``) is the default and the reference.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hwslim.core.config import ChannelConfig
from hwslim.importing.data import spread
from hwslim.core.accuracy import preserved_bn_stats
from hwslim.core.errors import HwslimError
from hwslim.core.graph import INPUT, run_graph
from hwslim.core.slimmable import BN_TYPES, recalibrate_bn
from hwslim.core.supernet import SlimmableNet

# Defaults of hwslim search, measured with benchmarks/search_speed.py (see the README's Search section).
DEFAULT_BN = "batch"
DEFAULT_SCREEN_IMAGES = 200
DEFAULT_KEEP = 4
# Images per scoring chunk (with --bn batch, the images each BN statistic is taken over):
# up to CHUNK_IMAGES (BN statistics of one 1,000-image chunk keep the decisions of
# recalibrated BN, 9 of 10 steps; chunks of 250, 5 of 10), as long as a chunk holds no
# more pixels than CHUNK_IMAGES images at 32 px (memory), and at least MIN_CHUNK_IMAGES.
CHUNK_IMAGES = 1000
MIN_CHUNK_IMAGES = 250

BN_MODES = ("recal", "batch")
EVAL_MODES = ("fast", "reference")
KERNELS = ("torch", "triton")


def default_chunk(images: torch.Tensor) -> int:
    """The default images per scoring chunk for ``images`` (N, C, H, W): see ``CHUNK_IMAGES``."""
    pixels = images.shape[-1] * images.shape[-2] if images.dim() == 4 else 32 * 32
    return max(MIN_CHUNK_IMAGES, min(CHUNK_IMAGES, CHUNK_IMAGES * 32 * 32 // pixels))


@dataclass(frozen=True)
class Score:
    """Search-split accuracy (0..1) and mean cross-entropy (a tie-breaker)."""

    acc: float
    loss: float


Candidates = Sequence[tuple[str, ChannelConfig]]
# How a caller ranks candidate i by its score, given the current config's score on the same
# images: a sort key, smaller is better (:func:`hwslim.search.greedy.slim` passes its criterion's).
Rank = Callable[[Score, int, Score], tuple]


def _strided_chunks(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``x`` in strided chunks (chunk ``c`` holds items ``c, c + C, ...``), as views of one
    reordered copy; images channels-last (NHWC), which PyTorch's CPU convolutions and
    train-mode BatchNorm run about twice as fast."""
    n = len(x)
    count = max(1, -(-n // batch_size))
    if count > 1:
        x = x.index_select(0, torch.cat([torch.arange(c, n, count) for c in range(count)]).to(x.device))
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # no copy when it already is
    return list(x.split([len(range(c, n, count)) for c in range(count)]))


class StepEvaluator:
    """Scores configs of ``model`` on fixed ``images``/``labels`` (held in memory on their device).

    ``calib_images`` (``bn="recal"`` only): recalibrate BN on this many images spread
    over the split (None: all of them), then score on all of them.
    """

    def __init__(self, model: SlimmableNet, images: torch.Tensor, labels: torch.Tensor, *, bn: str = "recal",
                 mode: str = "fast", batch_size: int | None = None, kernels: str = "torch",
                 calib_images: int | None = None) -> None:
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        if kernels == "triton":
            import hwslim.kernels as _k

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
        if calib_images is not None and (bn != "recal" or calib_images < 1):
            raise ValueError(f"calib_images needs bn='recal' and at least 1 image, got {calib_images!r} with bn={bn!r}")
        self.model, self.bn, self.mode = model, bn, mode
        batch_size = default_chunk(images) if batch_size is None else batch_size
        self.chunks = _strided_chunks(images, batch_size)
        self.label_chunks = _strided_chunks(labels, batch_size)
        self.n = len(labels)
        self.calib_chunks = self.chunks
        if calib_images is not None and calib_images < self.n:
            self.calib_chunks = _strided_chunks(images[spread(self.n, calib_images).to(images.device)], batch_size)
        self.calib_images = sum(len(c) for c in self.calib_chunks)
        nodes = model.nodes
        self._start = {u: mixing_start(model, u) for u in model.units}
        self._last = len(nodes) - 1
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
        """Score the model's current config from node ``start`` on, given the inputs there
        (``train_envs``: the calibration chunks', ``eval_envs``: the scored chunks')."""
        if self.bn == "batch":
            self._set_modes(bn_train=True)
            return self._score_logits([self._run(env, start) for env in eval_envs])
        self._reset_bn(start, len(self.model.nodes))
        self._set_modes(bn_train=True)
        for env in train_envs:
            self._run(env, start)
        self._set_modes(bn_train=False)
        return self._score_logits([self._run(env, start) for env in eval_envs])

    def _slice(self, envs: list, have: Mapping[str, int], want: Mapping[str, int]) -> list:
        """The live tensors ``envs``, computed at widths ``have``, cut to the (no wider) widths ``want``:
        each unit's first channels (its part's first channels, in a concatenation)."""
        cut: dict[str, torch.Tensor | int] = {}
        for name in envs[0] if envs else ():
            parts = [(r, r) if isinstance(r, int) else (have[r], want[r]) for r in self.model.tensor_layout(name)]
            if all(h == w for h, w in parts):
                continue
            k = self.model.per_channel(name)
            if len(parts) == 1:
                cut[name] = parts[0][1] * k  # a prefix (features of the kept channels, if flattened)
                continue
            idx, off = [], 0
            for h, w in parts:
                idx.append(torch.arange(off * k, (off + w) * k))
                off += h
            cut[name] = torch.cat(idx)
        if not cut:
            return envs
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

        outs = step_logits(self.model, self.chunks, list(configs), bn=self.bn,
                           calib_chunks=None if self.calib_chunks is self.chunks else self.calib_chunks)
        return [self._score_logits([o[k] for o in outs]) for k in range(len(configs))]

    @torch.no_grad()
    def score(self, config: ChannelConfig) -> Score:
        """Score one config with a full pass."""
        if self.kernels == "triton":
            return self._triton_scores([config])[0]
        model = self.model
        was_training = model.training
        with model.using(config), preserved_bn_stats(model):
            envs = [{INPUT: x} for x in self.chunks]
            calib = envs if self.calib_chunks is self.chunks else [{INPUT: x} for x in self.calib_chunks]
            score = self._suffix_score(0, calib, envs)
        model.train(was_training)
        return score

    @torch.no_grad()
    def score_candidates(self, current: ChannelConfig, candidates: Candidates,
                         rank: Rank | None = None) -> list[Score]:
        """Scores of ``candidates`` ((label, config) pairs), each differing from ``current`` in any
        units, narrower or wider. Every candidate is scored (``rank`` is for scorers that prune,
        :class:`Halving`)."""
        if self.kernels == "triton":
            return self._triton_scores([cfg for _, cfg in candidates])
        if self.mode == "reference":
            return [self.score(cfg) for _, cfg in candidates]
        model = self.model
        was_training = model.training
        configs = [cfg for _, cfg in candidates]
        changed = [[u for u, w in cfg.widths.items() if w != current.widths[u]] for cfg in configs]
        starts = [min((self._start[u] for u in ch), default=self._last) for ch in changed]
        order = sorted(range(len(configs)), key=starts.__getitem__)

        def envelope(ks: Sequence[int]) -> dict[str, int]:
            """Current widths, each unit a candidate in ``ks`` changes at the widest any asks for."""
            w = dict(current.widths)
            for k in ks:
                for u in changed[k]:
                    w[u] = max(w[u], configs[k].widths[u])
            return w

        scores: list[Score | None] = [None] * len(configs)
        with preserved_bn_stats(model):
            eval_envs = [{INPUT: x} for x in self.chunks]
            train_envs = eval_envs if self.calib_chunks is self.chunks else [{INPUT: x} for x in self.calib_chunks]
            recal = self.bn == "recal"
            have, pos = envelope(order), 0
            for j, k in enumerate(order):
                start = starts[k]
                if start > pos:  # advance the shared prefix to `start`, at the envelope of the candidates left
                    env_w = envelope(order[j:])
                    train_envs, eval_envs = self._slice(train_envs, have, env_w), self._slice(eval_envs, have, env_w)
                    have = env_w
                    with model.using(model.config_of(env_w)):
                        self._set_modes(bn_train=True)
                        if recal:
                            self._reset_bn(pos, start)
                        train_envs = [self._run(env, pos, start) for env in train_envs]
                        if recal:
                            self._set_modes(bn_train=False)
                            eval_envs = [self._run(env, pos, start) for env in eval_envs]
                        else:
                            eval_envs = train_envs
                    pos = start
                cfg = configs[k]
                with model.using(cfg):
                    scores[k] = self._suffix_score(start, self._slice(train_envs, have, cfg.widths),
                                                   self._slice(eval_envs, have, cfg.widths))
        model.train(was_training)
        return scores  # type: ignore[return-value]


class Halving:
    """Successive halving over a step's candidates: all on a few images, the best few on all.

    ``screen`` and ``full`` are ``score_candidates`` callables (a :class:`StepEvaluator`'s
    on an evenly spread subset of the search split, and on the whole split). Each call
    scores every candidate and the current config with ``screen``, keeps the ``keep``
    best by ``rank`` (the caller's own rule, given the current config's screening score;
    default: highest accuracy, then lowest loss) and scores only those with ``full``.
    The others get ``None``: not chosen. With ``keep`` or fewer candidates it is
    ``full`` alone, so the step decides exactly as full scoring does whenever full
    scoring's choice ranks among the ``keep`` best on the subset.

        >>> scorer = Halving(small.score_candidates, ev.score_candidates, keep=3)
        >>> scores = scorer(current, candidates)      # None for the candidates screened out
    """

    def __init__(self, screen: Callable[..., list[Score]], full: Callable[..., list[Score]], keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.screen, self.full, self.keep = screen, full, keep
        self.screened = self.kept = 0  # candidates seen, and those scored in full (for reports)

    def __call__(self, current: ChannelConfig, candidates: Candidates, rank: Rank | None = None
                 ) -> list[Score | None]:
        self.screened += len(candidates)
        if len(candidates) <= self.keep:
            self.kept += len(candidates)
            return self.full(current, candidates)
        quick = self.screen(current, [*candidates, ("", current)])
        base, quick = quick[-1], quick[:-1]
        key = rank or (lambda _base, i, s: (-s.acc, s.loss, i))
        best = sorted(sorted(range(len(candidates)), key=lambda i: key(base, i, quick[i]))[:self.keep])
        self.kept += len(best)
        out: list[Score | None] = [None] * len(candidates)
        for i, s in zip(best, self.full(current, [candidates[i] for i in best])):
            out[i] = s
        return out


@dataclass(frozen=True)
class Scoring:
    """How a search scores configs on its split (``hwslim search`` flags of the same names).

    ``bn``, ``mode``, ``batch_size``, ``kernels``: as :class:`StepEvaluator`.
    ``calib_images``: recalibrate BN on this many images spread over the split (None:
    all; ``bn="recal"`` only). ``screen_images``: successive halving (:class:`Halving`),
    every candidate of a step screened on this many images spread over the split and
    only the ``keep`` best scored on all of them (None: every candidate on all).
    """

    bn: str = DEFAULT_BN
    mode: str = "fast"
    batch_size: int | None = None
    kernels: str = "torch"
    calib_images: int | None = None
    screen_images: int | None = DEFAULT_SCREEN_IMAGES
    keep: int = DEFAULT_KEEP
    uses_split: ClassVar[bool] = True  # scores on the checkpoint's search split (images, labels)

    def build(self, model: SlimmableNet, images: torch.Tensor, labels: torch.Tensor,
              wrap: Callable[[Callable], Callable] = lambda f: f
              ) -> tuple[Callable[..., list[Score | None]], Callable[[ChannelConfig], Score]]:
        """``(score_candidates, score)`` on ``images``: the scorer of a step's candidates (a
        :class:`Halving` when ``screen_images`` is set and smaller than the split) and of one config.
        ``wrap`` wraps each evaluator's ``score_candidates`` (``hwslim.search.distributed.sharded``)."""
        n = len(labels)
        chunk = self.chunk(images)
        calib = None if self.calib_images is None or self.calib_images >= n else self.calib_images
        full = StepEvaluator(model, images, labels, bn=self.bn, mode=self.mode, batch_size=chunk,
                             kernels=self.kernels, calib_images=calib)
        if not self.screen_images or self.screen_images >= n:
            return wrap(full.score_candidates), full.score
        idx = spread(n, self.screen_images).to(images.device)
        screen = StepEvaluator(model, images[idx], labels[idx], bn=self.bn, mode=self.mode,
                               batch_size=chunk, kernels=self.kernels,
                               calib_images=None if calib is None or calib >= len(idx) else calib)
        return Halving(wrap(screen.score_candidates), wrap(full.score_candidates), self.keep), full.score

    def settings(self) -> dict[str, Any]:
        """What a resumed search must share (JSON)."""
        return asdict(self)

    def chunk(self, images: torch.Tensor) -> int:
        """Images per chunk on ``images``: ``batch_size``, else :func:`default_chunk`."""
        return self.batch_size if self.batch_size is not None else default_chunk(images)

    def describe(self, n: int, chunk: int | None = None) -> str:
        """What the scorer does on a split of ``n`` images (in chunks of ``chunk``, default
        ``batch_size`` or ``CHUNK_IMAGES``), in words (for the search's first line)."""
        chunk = chunk or self.batch_size or CHUNK_IMAGES
        if self.bn == "recal":
            c = n if self.calib_images is None else min(n, self.calib_images)
            bn = f"BN recalibrated per candidate on {c:,} of them"
        else:
            bn = f"BN statistics of each chunk of {min(n, chunk):,}"
        how = (f"each candidate screened on {self.screen_images:,} images, the best {self.keep} scored on all "
               f"{n:,}" if self.screen_images and self.screen_images < n else f"each candidate scored on {n:,} images")
        return f"{how} ({bn}; {self.mode} evaluator)"


class ScoreFnEvaluator:
    """Scores configs of ``model`` with the user's ``score_fn(model) -> float`` (higher is better:
    mAP, mIoU, a negative validation loss), for any task and output structure.

    Each config runs as the supernet at that config, in eval mode, under ``torch.no_grad``;
    its BatchNorm statistics are recalibrated first on ``calib`` (any re-iterable of batches,
    a DataLoader; ``inputs(batch)`` gives the network's input, default ``batch[0]`` of a tuple;
    at most ``calib_batches`` of them), or are the supernet's running statistics without
    ``calib``. The supernet's own statistics, config and mode are restored after every call.
    A :class:`Score` carries the score in ``acc`` (what the search maximizes) and 0 as ``loss``
    (a score function gives one number, so ties keep the greedy walk's order).
    """

    def __init__(self, model: SlimmableNet, score_fn: Callable[[nn.Module], float], *, calib: Iterable | None = None,
                 inputs: Callable[[Any], Any] | None = None, calib_batches: int | None = None) -> None:
        if not callable(score_fn):
            raise HwslimError(f"score_fn must be a callable score_fn(model) -> float, got {type(score_fn).__name__}")
        if calib is not None and iter(calib) is calib:
            raise HwslimError("calib must be re-iterable (a DataLoader or a list of batches), not an iterator: "
                              "BN is recalibrated once per scored config")
        if calib_batches is not None and calib_batches < 1:
            raise HwslimError(f"calib_batches must be at least 1, got {calib_batches}")
        self.model, self.score_fn, self.calib, self.inputs, self.calib_batches = (
            model, score_fn, calib, inputs, calib_batches)

    @torch.no_grad()
    def score(self, config: ChannelConfig) -> Score:
        """``score_fn`` of the supernet at ``config``, BN recalibrated on ``calib`` first."""
        model = self.model
        was_training = model.training
        try:
            with model.using(config), preserved_bn_stats(model):
                if self.calib is not None:
                    recalibrate_bn(model, self.calib, self.calib_batches, self.inputs)
                model.eval()
                value = self.score_fn(model)
        finally:
            model.train(was_training)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise HwslimError(f"score_fn returned {type(value).__name__}, not a number") from None
        if not math.isfinite(value):
            raise HwslimError(f"score_fn returned {value}; it must be a finite number (higher is better)")
        return Score(value, 0.0)

    def score_candidates(self, current: ChannelConfig, candidates: Candidates,
                         rank: Rank | None = None) -> list[Score]:
        """Every candidate scored in full (a score function has no cheaper screening)."""
        return [self.score(cfg) for _, cfg in candidates]


@dataclass(frozen=True)
class ScoreFnScoring:
    """A search scored by the user's function (:class:`ScoreFnEvaluator`) instead of top-1 on the
    checkpoint's search split: what :class:`hwslim.search.greedy.SearchOptions` takes as ``scoring``
    for detection, segmentation or any task."""

    score_fn: Callable[[nn.Module], float]
    calib: Iterable | None = None  # batches for BN recalibration per config (None: running statistics)
    inputs: Callable[[Any], Any] | None = None  # inputs(batch) -> the network's input
    calib_batches: int | None = None  # at most this many calibration batches (None: all)
    uses_split: ClassVar[bool] = False  # scores without the checkpoint's search split

    @property
    def bn(self) -> str:
        return "recal" if self.calib is not None else "running"

    def build(self, model: SlimmableNet, wrap: Callable[[Callable], Callable] = lambda f: f
              ) -> tuple[Callable[..., list[Score | None]], Callable[[ChannelConfig], Score]]:
        """``(score_candidates, score)``, as :meth:`Scoring.build`."""
        ev = ScoreFnEvaluator(model, self.score_fn, calib=self.calib, inputs=self.inputs,
                              calib_batches=self.calib_batches)
        return wrap(ev.score_candidates), ev.score

    def settings(self) -> dict[str, Any]:
        """What a resumed search must share (JSON): the function's name, the BN calibration."""
        fn = self.score_fn
        return {"score_fn": f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}",
                "bn": self.bn, "calib_batches": self.calib_batches}

    def describe(self) -> str:
        bn = ("BN recalibrated per config on the calibration batches" if self.calib is not None
              else "the supernet's running BN statistics")
        return f"each candidate scored by {self.settings()['score_fn']} ({bn})"


def mixing_start(model: SlimmableNet, unit: str) -> int:
    """Index of the first node whose outputs mix the channels of ``unit`` (or whose inner width it is)."""
    for i, n in enumerate(model.nodes):
        if n.mid == unit:
            return i
        if n.op.mixes and any(unit in model.tensor_layout(t) for t in n.inputs):
            return i
    raise ValueError(f"no node reads unit {unit!r}")
