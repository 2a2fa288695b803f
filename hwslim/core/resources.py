"""Sizes the machine cannot hold are refused before any work, with how much they would need.

An input size of 100,000 pixels or a batch of a trillion is a typo, not a job: left
alone it allocates until the kernel kills the process (or runs for minutes first).
Each command estimates the memory its largest step needs from the layer specs (no
tensor is allocated) and compares it with this machine's memory.
"""
from __future__ import annotations

import os

from hwslim.core.errors import HwslimError

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class ResourceError(HwslimError):
    """A size whose work cannot fit in this machine's memory."""


def machine_memory_bytes() -> int:
    """Physical memory of this machine (bytes)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a large machine
        return 1 << 40


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**30 * 1e6 else f"{n / 2**30:.3g} GiB"


def check_fits(needed: float, what: str, hint: str = "lower it") -> None:
    """Refuse (ResourceError) ``what`` when ``needed`` bytes exceed this machine's memory."""
    have = machine_memory_bytes()
    if needed > have:
        raise ResourceError(f"{what} would need about {gib(needed)} of memory, more than this machine's "
                            f"{gib(have)}; {hint}")


def _specs(net, config, batch: int, input_size: int | None):
    return net.layer_specs(config, batch=batch, input_size=input_size)


def inference_bytes(net, config=None, *, batch: int = 1, input_size: int | None = None,
                    dtype: str = "float32") -> int:
    """Peak activations of one forward pass plus the weights (what inference holds at once)."""
    from hwslim.core.costs import spec_costs

    c = spec_costs(_specs(net, config, batch, input_size), dtype)
    return int(c.peak_activation_bytes + c.params * _DTYPE_BYTES.get(dtype, 4))


def training_bytes(net, *, batch: int, input_size: int | None = None) -> int:
    """A lower bound for one training step of the widest config: every layer's output is kept
    for the backward pass (fp32), plus weights, gradients and momentum."""
    from hwslim.core.costs import spec_costs

    specs = _specs(net, None, batch, input_size)
    outputs = sum(s.batch * s.cout * s.out_h * s.out_w for s in specs)
    inputs = batch * specs[0].cin * specs[0].in_h * specs[0].in_w
    return int(4 * (outputs + inputs) + 3 * 4 * spec_costs(specs).params)


def check_inference(net, config=None, *, batch: int = 1, input_size: int | None = None, dtype: str = "float32",
                    what: str | None = None) -> None:
    size = input_size if input_size is not None else net.input_size
    check_fits(inference_bytes(net, config, batch=batch, input_size=input_size, dtype=dtype),
               what or f"{net.name} at {size}x{size} px, batch {batch:,}",
               "lower --input-size or --batch")


def check_training(net, *, batch: int, input_size: int | None = None) -> None:
    size = input_size if input_size is not None else net.input_size
    check_fits(training_bytes(net, batch=batch, input_size=input_size),
               f"training {net.name} at {size}x{size} px with batches of {batch:,}",
               "lower --input-size or --batch-size")
