"""hwslim: hardware-aware AutoSlim. Channel counts for the best accuracy under a real budget.

The Python API (:mod:`hwslim.pipeline.api`), loaded on first use so that ``import hwslim``
stays cheap (PEP 562)::

    import hwslim
    net = hwslim.load("runs/r20/checkpoint.pt")          # .supernet, .module(config), .configs(), .costs()
    small = net.module("search/config_latency_ms_0.5.json")  # a plain nn.Module, BatchNorm folded
    supernet = hwslim.import_model(my_module, example_input)
    hwslim.sandwich_step(supernet, batch, loss_fn, optimizer)   # your training loop, any task
    hwslim.recalibrate_bn(supernet, loader, config)              # BatchNorm statistics of a config
    configs = hwslim.search_configs(supernet, params_m=0.5, score_fn=my_map, calib=loader)
    hwslim.save(supernet, "runs/mine/checkpoint.pt")             # for hwslim cost / export / load
    configs = hwslim.search_configs("runs/r20/checkpoint.pt", params_m=[0.2, 0.1])
    hwslim.export_model("runs/r20/checkpoint.pt", configs[0], "r20.pt2", format="torch")

(``search_configs`` and ``export_model``, not ``search`` and ``export``: those names are the
stages' subpackages, which replace a package attribute of their name when imported.)
"""
from hwslim.core.version import __version__

_API = ("load", "import_model", "sandwich_step", "recalibrate_bn", "search_configs", "export_model", "save")


def __getattr__(name: str):
    if name in _API:
        from hwslim.pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'hwslim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
