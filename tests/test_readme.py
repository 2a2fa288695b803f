"""The README's Python example runs as written and shows how to run the supernet at a config."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_python_api_example_runs_the_supernet_at_a_config_and_explains_the_parameter_count(capsys):
    from hwslim.core.costs import model_costs

    (block,) = _python_blocks()
    assert "net.using(cfg)" in block  # `net(x, cfg)` is not the API: the example shows the one that is
    ns: dict = {}
    exec(compile(block, str(README), "exec"), ns)
    net, cfg, small, x, y = (ns[k] for k in ("net", "cfg", "small", "x", "y"))
    with torch.no_grad():
        assert torch.allclose(small(x), y, atol=1e-4)
    folded = sum(p.numel() for p in small.parameters())
    assert str(folded) in capsys.readouterr().out
    assert folded < model_costs(net, cfg).params  # and the README says why
    assert f"{model_costs(net, cfg).params:,} vs {folded:,}" in README.read_text()
