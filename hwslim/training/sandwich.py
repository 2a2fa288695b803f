"""One sandwich-rule step of a slimmable supernet, for any task: the step ``hwslim train`` takes.

Each step runs one batch through several channel configs and sums their gradients
before one optimizer step (Yu & Huang's *sandwich rule*, as AutoSlim trains): the
**widest** config learns from the user's loss; the **narrowest** and ``num_random``
**random** per-unit configs learn from the widest config's detached outputs (*in-place
distillation*), or from the user's loss too with ``distill=False``. Training the
extremes every step bounds every config in between; the teacher's outputs give the
narrow configs a smoother target than the labels.

The outputs may be any structure the network returns: a tensor, or tuples, lists and
dicts of tensors (a detector's levels, a segmenter's ``{"out", "aux"}``). The default
distillation loss (:func:`distill_loss`) walks the student's and the teacher's outputs
together and sums one term per tensor: soft cross-entropy to the teacher's softmax for
logits shaped ``(N, C)`` (KL divergence up to a constant, AutoSlim's loss), mean squared
error for every other shape (dense maps, boxes). Pass ``distill_fn(student, teacher)``
for another (a per-pixel KL for segmentation logits, a detector's own loss on the
teacher's decoded boxes)::

    >>> opt = torch.optim.SGD(supernet.parameters(), lr=0.05, momentum=0.9)
    >>> for images, masks in loader:
    ...     r = sandwich_step(supernet, (images, masks), lambda out, b: F.cross_entropy(out, b[1]), opt)
    >>> r.widest, r.narrowest          # the losses of the last step (device tensors)
"""
from __future__ import annotations

import contextlib
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hwslim.core.config import ChannelConfig
from hwslim.core.errors import HwslimError
from hwslim.core.slimmable import batch_inputs
from hwslim.core.supernet import SlimmableNet

LossFn = Callable[[Any, Any], torch.Tensor]  # loss_fn(outputs, batch) -> scalar
DistillFn = Callable[[Any, Any], torch.Tensor]  # distill_fn(student_outputs, teacher_outputs) -> scalar


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to a soft target: the in-place distillation loss (KL up to a constant)."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


def output_pairs(student: Any, teacher: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The tensors of two outputs of the same structure, paired leaf by leaf (dicts by key)."""
    if isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor):
        return [(student, teacher)]
    if isinstance(student, Mapping) and isinstance(teacher, Mapping) and student.keys() == teacher.keys():
        return [p for k in student for p in output_pairs(student[k], teacher[k])]
    if (isinstance(student, (tuple, list)) and isinstance(teacher, (tuple, list))
            and len(student) == len(teacher)):
        return [p for s, t in zip(student, teacher) for p in output_pairs(s, t)]
    raise HwslimError(f"the student's and the teacher's outputs differ in structure ({type(student).__name__} vs "
                      f"{type(teacher).__name__}); give distill_fn for outputs that are not tensors, tuples, lists "
                      "or dicts of them")


def map_outputs(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``out`` with ``fn`` applied to every tensor, its structure kept."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, Mapping):
        return type(out)((k, map_outputs(v, fn)) for k, v in out.items())
    if isinstance(out, (tuple, list)):
        return type(out)(map_outputs(v, fn) for v in out)
    return out


def distill_loss(student: Any, teacher: Any) -> torch.Tensor:
    """The default in-place distillation loss: summed over the outputs' floating-point tensors,
    soft cross-entropy to the teacher's softmax for ``(N, C)`` logits, mean squared error for any
    other shape."""
    terms = [soft_cross_entropy(s, F.softmax(t, dim=1)) if s.dim() == 2 else F.mse_loss(s, t)
             for s, t in output_pairs(student, teacher) if s.is_floating_point()]
    if not terms:
        raise HwslimError("the network's outputs hold no floating-point tensor to distill; give distill_fn")
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


def sandwich_configs(net: SlimmableNet, num_random: int, rng: random.Random) -> list[ChannelConfig]:
    """[widest, narrowest, num_random random per-unit configs]: the configs of one step."""
    return [net.full_config(), net.min_config()] + [net.random_config(rng) for _ in range(num_random)]


@dataclass(frozen=True)
class StepResult:
    """What one :func:`sandwich_step` did: each config's loss (detached, on the model's device:
    reading one waits for the device), the configs, the widest config's outputs (detached), and
    the gradients' total norm before clipping (``clip_grad_norm``; None without it)."""

    losses: tuple[torch.Tensor, ...]
    configs: tuple[ChannelConfig, ...]
    output: Any
    grad_norm: torch.Tensor | None = None

    @property
    def widest(self) -> torch.Tensor:
        return self.losses[0]

    @property
    def narrowest(self) -> torch.Tensor:
        return self.losses[1] if len(self.losses) > 1 else torch.zeros_like(self.losses[0])

    @property
    def random(self) -> torch.Tensor:
        """The mean loss of the random configs (0 without any)."""
        zero = torch.zeros_like(self.losses[0])
        return sum(self.losses[2:], zero) / max(1, len(self.losses) - 2)


def supernet_of(model: nn.Module) -> SlimmableNet:
    """The supernet ``model`` is or wraps (DistributedDataParallel)."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not isinstance(net, SlimmableNet):
        raise HwslimError(f"the sandwich step trains a slimmable supernet (hwslim.import_model), not a "
                          f"{type(net).__name__}")
    return net


def _torch_seeded_rng() -> random.Random:
    """Config draws that ``torch.manual_seed`` makes repeatable."""
    return random.Random(int(torch.randint(0, 2 ** 62, ())))


def sandwich_step(model: nn.Module, batch: Any, loss_fn: LossFn, optimizer: torch.optim.Optimizer, *,
                  num_random: int = 2, rng: random.Random | None = None,
                  configs: Sequence[ChannelConfig] | None = None, distill: bool = True,
                  distill_fn: DistillFn | None = None, inputs: Callable[[Any], Any] | None = None,
                  scaler: torch.amp.GradScaler | None = None,
                  autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                  clip_grad_norm: float | None = None) -> StepResult:
    """One optimizer step of the supernet ``model`` (or its DistributedDataParallel) on ``batch``.

    ``loss_fn(outputs, batch)`` is the task's loss (it takes its targets from ``batch``);
    ``inputs(batch)`` the network's input (default: ``batch[0]`` of a tuple or list, else
    ``batch``). ``configs`` (default :func:`sandwich_configs` with ``num_random`` configs
    drawn from ``rng``, itself seeded from torch's RNG by default): ``configs[0]`` learns from
    ``loss_fn`` and teaches the others through ``distill_fn`` (default :func:`distill_loss`)
    when ``distill``. Outputs are cast to float32 before the losses (mixed precision);
    ``scaler``/``autocast``: a GradScaler and an autocast context factory, for CUDA.
    ``clip_grad_norm``: clip the summed gradients' total norm to this before the step (a
    detector's trainer does, e.g. Ultralytics' at 10: one bad batch otherwise throws AdamW
    off); the norm before clipping is ``StepResult.grad_norm``. Default: no clipping.
    Under DDP gradients are reduced once, after the last config's backward. The supernet
    is left at ``configs[0]``. The caller steps its LR scheduler and puts the model in
    train mode (``import_model`` returns it in eval mode: BatchNorm would then normalize
    with its initial statistics and the network barely learns).
    """
    net = supernet_of(model)
    if not model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        warnings.warn("sandwich_step: the supernet is in eval mode (hwslim.import_model returns it so), so its "
                      "BatchNorm layers normalize with fixed statistics and it barely learns; call model.train() "
                      "before training", stacklevel=2)
    configs = list(configs) if configs is not None else sandwich_configs(net, num_random, rng or _torch_seeded_rng())
    x = (inputs or batch_inputs)(batch)
    distill_fn = distill_fn or distill_loss
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    optimizer.zero_grad(set_to_none=True)
    # losses stay on the device: reading them every step would stall a GPU's queue
    teacher, losses = None, []
    for i, cfg in enumerate(configs):
        net.set_config(cfg)
        sync = model.no_sync() if ddp and i < len(configs) - 1 else contextlib.nullcontext()
        with sync:
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = model(x)
            out = map_outputs(out, lambda t: t.float() if t.is_floating_point() else t)
            loss = loss_fn(out, batch) if teacher is None or not distill else distill_fn(out, teacher)
            if teacher is None:
                teacher = map_outputs(out, torch.Tensor.detach)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.append(loss.detach())
    net.set_config(configs[0])
    grad_norm = None
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm).detach()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(tuple(losses), tuple(configs), teacher, grad_norm)
