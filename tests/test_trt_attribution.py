"""TensorRT per-layer times -> hwslim layer specs, on recorded inspector and profiler data."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from hwslim.runtimes.onnx_file import export_onnx
from hwslim.core.graph import layer_spec
from hwslim.core.ops import Conv
from hwslim.core.materialize import materialize
from hwslim.models import create_model
from profilers.trt_attribution import (EngineLayer, average_from_trtexec_profile, onnx_node_owners,
                                       onnx_nodes_in_name, onnx_op_types, onnx_order, parse_engine_information,
                                       plan_attribution, roofline_weight, runs_from_callbacks)

DATA = Path(__file__).parent / "data" / "trt"
STEM = "resnet20_w025_s8_b1_fp16"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = create_model("resnet20", width_mult=0.25, input_size=8).eval()
    plain = materialize(net, net.full_config(), fold_bn=True).eval()
    path = export_onnx(plain, tmp_path_factory.mktemp("onnx") / "r20.onnx", input_size=8)
    return onnx.load(str(path)), list(plain.specs)


@pytest.fixture(scope="module")
def layers():
    return parse_engine_information((DATA / f"{STEM}.engine.json").read_text())


@pytest.fixture(scope="module")
def plan(exported, layers):
    model, specs = exported
    return plan_attribution(layers, onnx_node_owners(model, specs), onnx_order(model), onnx_op_types(model), specs)


@pytest.fixture(scope="module")
def runs():
    return runs_from_callbacks(json.loads((DATA / f"{STEM}.profiler_calls.json").read_text())["calls"])


def test_onnx_nodes_are_traced_to_their_specs(exported):
    model, specs = exported
    owners = onnx_node_owners(model, specs)
    assert owners["/stem/Conv"] == owners["/Relu"] == "stem"
    assert owners["/l1b0/conv2/Conv"] == owners["/Add"] == owners["/Relu_2"] == "l1b0/conv2"
    # the add of a downsampling block belongs to the conv whose spec has the residual, not the shortcut
    assert owners["/Add_3"] == owners["/Relu_8"] == "l2b0/conv2"
    assert owners["/l2b0/shortcut/Conv"] == "l2b0/shortcut"
    assert owners["/GlobalAveragePool"] == owners["/Flatten"] == "pool"
    assert owners["/fc/Gemm"] == "fc"
    assert set(owners.values()) == {s.name for s in specs}
    assert not any(onnx_op_types(model)[n] in ("Constant", "Identity") for n in owners)


def test_recorded_engine_uses_the_names_export_onnx_writes(exported, layers):
    model, _ = exported
    names = set(onnx_order(model))
    used = {n for layer in layers for n in layer.onnx_nodes}
    assert used and used <= names


def test_inspector_json_is_parsed(layers):
    assert len(layers) == 26
    first = layers[0]
    assert first.inserted and first.inputs == ("input",) and not first.onnx_nodes
    fused = next(layer for layer in layers if layer.name == "/l2b0/shortcut/Conv + /Add_3 + /Relu_8")
    assert fused.onnx_nodes == ("/l2b0/shortcut/Conv", "/Add_3", "/Relu_8")
    assert fused.inputs == ("/Relu_6_output_0", "/l2b0/conv2/Conv_output_0")
    assert layers[-1].foreign and layers[-1].onnx_nodes == ("/GlobalAveragePool", "/Flatten", "/fc/Gemm")
    no_meta = next(layer for layer in layers if layer.name == "/l3b1/conv1/Conv + /Relu_15")
    assert no_meta.onnx_nodes == ()


def test_tensorrt_11_schema_and_names_only_engines_parse():
    info = {"Layers": [{"Name": "/a/Conv + /Relu", "LayerType": "CaskConvolution",
                        "Inputs": [{"Name": "input", "Format": "kHWC8", "DataType": "Half"}],
                        "Outputs": [{"Name": "/Relu_output_0", "Format": "kHWC8", "DataType": "Half"}],
                        "Metadata": "[ONNX Layer: /a/Conv | x (f)]\x1e[ONNX Layer: /Relu]"}],
            "I/O Tensors": [{"Name": "input", "IOMode": "Input"}]}
    (layer,) = parse_engine_information(json.dumps(info))
    assert layer.onnx_nodes == ("/a/Conv", "/Relu") and layer.outputs == ("/Relu_output_0",)
    assert [x.name for x in parse_engine_information({"Layers": ["/a/Conv + /Relu", "x"]})] == ["/a/Conv + /Relu", "x"]


def test_node_names_are_read_from_layer_names_with_boundaries():
    order = ["/a/Conv", "/Relu_1", "/Relu_17", "/b/Conv", "/Add_8", "/c/Gemm"]
    assert onnx_nodes_in_name("/b/Conv + /Relu_17", order) == ("/Relu_17", "/b/Conv")
    assert onnx_nodes_in_name("PWN(PWN(/Add_8), /Relu_1)", order) == ("/Relu_1", "/Add_8")
    assert onnx_nodes_in_name("{ForeignNode[/Relu_17.../c/Gemm]}", order) == ("/Relu_17", "/b/Conv", "/Add_8",
                                                                               "/c/Gemm")
    assert onnx_nodes_in_name("Reformatting CopyNode for Input Tensor 0 to x", order) == ()


def test_fused_conv_relu_time_lands_on_its_spec(plan, runs):
    att = plan.apply(runs[0])
    assert runs[0]["/stem/Conv + /Relu"] == 0.0032
    # the stem also pays for the input reformat (fp32 NCHW -> fp16 HWC8) its conv asked for
    assert att.per_spec["stem"] == pytest.approx(0.0032 + 0.0016)
    assert att.per_spec["l1b0/conv1"] == pytest.approx(runs[0]["/l1b0/conv1/Conv + /Relu_1"])
    assert plan.shares["/l1b0/conv2/Conv + /Add + /Relu_2"] == {"l1b0/conv2": 1.0}


def test_reformat_time_goes_to_the_consumer(plan, runs):
    out_reformat = "Reformatting CopyNode for Output Tensor 0 to /l1b2/conv2/Conv + /Add_2 + /Relu_6"
    # its tensor is read by l2b0's conv1 and shortcut; the first consumer in execution order pays
    assert plan.shares[out_reformat] == {"l2b0/conv1": 1.0}
    att = plan.apply(runs[1])
    assert att.per_spec["l2b0/conv1"] == pytest.approx(runs[1]["/l2b0/conv1/Conv + /Relu_7"] + runs[1][out_reformat])
    assert att.per_spec["l1b2/conv2"] == pytest.approx(runs[1]["/l1b2/conv2/Conv + /Add_2 + /Relu_6"])


def test_add_fused_into_the_shortcut_is_charged_to_the_shortcut_kernel(plan):
    assert plan.shares["/l2b0/shortcut/Conv + /Add_3 + /Relu_8"] == {"l2b0/shortcut": 1.0}
    assert plan.shares["/l2b0/conv2/Conv"] == {"l2b0/conv2": 1.0}
    assert plan.shares["/l3b0/conv2/Conv + /Add_6 + /Relu_14"] == {"l3b0/conv2": 1.0}


def test_unfused_pointwise_and_nameonly_layers(plan):
    assert plan.shares["PWN(PWN(/Add_8), /Relu_18)"] == {"l3b2/conv2": 1.0}
    assert plan.shares["/l3b1/conv1/Conv + /Relu_15"] == {"l3b1/conv1": 1.0}  # no Metadata: from its name


def test_foreign_node_is_split_by_roofline_weight_and_flagged(plan, exported, runs):
    _, specs = exported
    fn = "{ForeignNode[/GlobalAveragePool.../fc/Gemm]}"
    by = {s.name: s for s in specs}
    wp, wf = roofline_weight(by["pool"]), roofline_weight(by["fc"])
    assert plan.shares[fn] == pytest.approx({"pool": wp / (wp + wf), "fc": wf / (wp + wf)})
    assert plan.split_layers == (fn,)
    # the reformat in front of it follows it into the same shares
    assert plan.shares[f"Reformatting CopyNode for Input Tensor 0 to {fn}"] == plan.shares[fn]
    att = plan.apply(runs[2])
    assert att.per_spec["pool"] + att.per_spec["fc"] == pytest.approx(runs[2][fn] + 0.0016 * 0.98)


def test_every_spec_gets_time_and_sums_are_preserved(plan, exported, runs):
    _, specs = exported
    assert plan.unowned == ()
    for run in runs:
        att = plan.apply(run)
        assert set(att.per_spec) == {s.name for s in specs}
        assert att.unattributed_ms == 0
        assert sum(att.per_spec.values()) == pytest.approx(sum(run.values()))


def test_profiler_formats(runs):
    assert len(runs) == 3 and all(len(r) == 26 for r in runs)
    assert runs[1]["/stem/Conv + /Relu"] == pytest.approx(0.0032 * 1.04)
    avg = average_from_trtexec_profile((DATA / f"{STEM}.trtexec_profile.json").read_text())
    for name, ms in avg.items():
        assert ms == pytest.approx(sum(r[name] for r in runs) / 3, abs=1e-6)


def test_conversion_at_the_output_goes_to_its_producer_and_unknown_layers_are_kept():
    spec = layer_spec("a", Conv(1, bn=False, bias=True), 8, 4, out=8, inputs=("input",))
    layers = [EngineLayer("/a/Conv", "CaskConvolution", ("input",), ("t",), ("/a/Conv",)),
              EngineLayer("Reformatting CopyNode for Output Tensor 0 to /a/Conv", "Reformat", ("t",), ("out",)),
              EngineLayer("mystery", "Shuffle", ("x",), ("y",))]
    plan = plan_attribution(layers, {"/a/Conv": "a"}, ["/a/Conv"], {"/a/Conv": "Conv"}, [spec])
    att = plan.apply({"/a/Conv": 0.01, layers[1].name: 0.002, "mystery": 0.001})
    assert att.per_spec == {"a": pytest.approx(0.012)}
    assert att.unattributed == {"mystery": 0.001} and att.total_ms == pytest.approx(0.013)
    assert plan.unowned == ("mystery",)


def test_names_only_engine_attributes_conversions_by_name():
    spec = layer_spec("a", Conv(1, bn=False, bias=True), 8, 4, out=8, inputs=("input",))
    layers = parse_engine_information({"Layers": ["Reformatting CopyNode for Input Tensor 0 to /a/Conv + /Relu",
                                                  "/a/Conv + /Relu"]})
    plan = plan_attribution(layers, {"/a/Conv": "a", "/Relu": "a"}, ["/a/Conv", "/Relu"],
                            {"/a/Conv": "Conv", "/Relu": "Relu"}, [spec])
    assert plan.shares == {"/a/Conv + /Relu": {"a": 1.0}, layers[0].name: {"a": 1.0}}


def test_reported_names_with_a_suffix_are_matched_to_their_layer(plan):
    att = plan.apply({"/stem/Conv + /Relu [profile 0]": 0.004, "__myl_unknown_kernel": 0.001})
    assert att.per_spec == {"stem": pytest.approx(0.004)}
    assert att.unattributed == {"__myl_unknown_kernel": 0.001}
