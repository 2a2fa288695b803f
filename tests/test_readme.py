"""The Python examples of the README and of docs/ run as written."""
from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONCEPTS = ROOT / "docs" / "concepts.md"


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def test_every_python_example_is_checked_here():
    """A new example in README.md or docs/ needs a test of its own below."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert {p.name: len(_python_blocks(p)) for p in pages if _python_blocks(p)} == {"README.md": 2, "concepts.md": 1}


def test_python_api_example_runs_the_supernet_at_a_config_and_explains_the_parameter_count(capsys):
    """docs/concepts.md: the supernet at a config, materialized, and why its parameter count is lower."""
    from hwslim.core.costs import model_costs

    (block,) = _python_blocks(CONCEPTS)
    assert "net.using(cfg)" in block  # `net(x, cfg)` is not the API: the example shows the one that is
    ns: dict = {}
    exec(compile(block, str(CONCEPTS), "exec"), ns)
    net, cfg, small, x, y = (ns[k] for k in ("net", "cfg", "small", "x", "y"))
    with torch.no_grad():
        assert torch.allclose(small(x), y, atol=1e-4)
    folded = sum(p.numel() for p in small.parameters())
    assert str(folded) in capsys.readouterr().out
    assert folded < model_costs(net, cfg).params  # and the page says why
    assert f"{model_costs(net, cfg).params:,} vs {folded:,}" in CONCEPTS.read_text()


def test_readme_python_api_example_returns_modules_configs_and_a_torch_program(tmp_path, monkeypatch, capsys):
    """README "The Python API": hwslim.import_model / load / search_configs / export_model, after the "Your own
    model" commands (here their checkpoint is written directly: an imported, untrained tiny CNN)."""
    import hwslim
    from hwslim.core.config import ChannelConfig
    from hwslim.examples.tiny_cnn import build
    from hwslim.importing.checkpoint import save_checkpoint
    from hwslim.importing.data import synthetic_data_info
    from hwslim.importing.fx_trace import import_model

    monkeypatch.chdir(tmp_path)
    save_checkpoint("runs/tiny/checkpoint.pt", import_model(build(), torch.randn(1, 3, 32, 32)),
                    data=synthetic_data_info(1000, 100, input_size=32))
    block = _python_blocks(README)[0]
    ns: dict = {}
    exec(compile(block, str(README), "exec"), ns)
    configs, small, result, program, x = (ns[k] for k in ("configs", "small", "result", "program", "x"))
    assert len(configs) == 2 and all(isinstance(c, ChannelConfig) for c in configs)
    assert isinstance(small, torch.nn.Module) and not any(isinstance(m, torch.nn.BatchNorm2d) for m in small.modules())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in build().parameters())
    assert result.path == Path("tiny.pt2") and (tmp_path / "tiny.pt2").is_file()
    assert result.engine_error is not None and result.engine_error < 1e-4  # the program checked against PyTorch
    with torch.no_grad():  # module() recalibrates BN at the config as export does: the same network
        assert torch.allclose(program(x), small(x), atol=1e-5, rtol=1e-4)
    raw = ns["net"].module(configs[-1], calib_images=0)  # the supernet's statistics: the supernet at the config
    supernet = ns["net"].supernet.eval()
    with torch.no_grad(), supernet.using(configs[-1]):
        assert torch.allclose(raw(x), supernet(x), atol=1e-5, rtol=1e-4)
    out = capsys.readouterr().out
    assert "channel units" in out and "Costs(" in out
    # the attributes are lazy (PEP 562), and none is shadowed by a subpackage imported meanwhile
    import hwslim.export.exporter  # noqa: F401  (sets hwslim.export, the subpackage)
    import hwslim.search.greedy  # noqa: F401

    assert set(hwslim.__all__) >= {"load", "import_model", "search_configs", "export_model"} and "load" in dir(hwslim)
    assert all(callable(getattr(hwslim, name)) for name in ("load", "import_model", "search_configs", "export_model"))


def test_readme_own_training_loop_example_trains_searches_saves_and_exports(tmp_path, monkeypatch, capsys):
    """README "Your own training loop": a segmenter trained with its own loss by the sandwich step,
    searched by its own metric, saved as a checkpoint and exported to ONNX, as written."""
    import hwslim
    from hwslim.core.costs import model_costs

    monkeypatch.chdir(tmp_path)
    block = _python_blocks(README)[1]
    ns: dict = {}
    exec(compile(block, str(README), "exec"), ns)
    supernet, configs, result, r = (ns[k] for k in ("supernet", "configs", "result", "r"))
    assert [model_costs(supernet, c).params <= b * 1e6 for c, b in zip(configs, (0.012, 0.006))] == [True, True]
    assert torch.isfinite(torch.stack(r.losses)).all() and len(r.losses) == 4
    assert result.max_rel_error < 1e-4 and (tmp_path / "seg.onnx").is_file()
    out = capsys.readouterr().out
    assert out.count("epoch ") == 3 and "ONNX Runtime vs PyTorch" in out
    for cfg in configs:  # what the example prints is the metric at the config, its own BN statistics
        hwslim.recalibrate_bn(supernet, ns["loader"], cfg)
        with supernet.using(cfg):
            assert f"{cfg.widths} {ns['pixel_acc'](supernet.eval()):.3f}" in out
    assert hwslim.load(tmp_path / "runs/seg/checkpoint.pt").supernet.units.keys() == supernet.units.keys()
