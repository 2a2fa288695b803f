"""The benchmark scripts' own logic (their measurements are run by hand on a quiet machine)."""
from __future__ import annotations

from benchmarks.lut_accuracy import MODELS, result_name


def test_lut_accuracy_result_names_keep_runs_apart():
    default = list(MODELS)
    assert result_name("cpu", "ort", 1, 1, "float32", default) == "lut_accuracy_cpu_ort_b1"  # the published file
    assert result_name("cpu", "ort", 1, 1, "float32", default[::-1]) == "lut_accuracy_cpu_ort_b1"
    # a subset never overwrites the default set's file; backend, threads, batch, dtype all named
    assert result_name("cpu", "ort", 1, 1, "float32", ["mobilenet_v2"]) == "lut_accuracy_cpu_ort_b1_mobilenet_v2"
    assert result_name("cpu", "openvino", 1, 1, "float32", ["mobilenet_v2"]) == \
        "lut_accuracy_cpu_openvino_b1_mobilenet_v2"
    assert result_name("cpu", "ort", 8, 2, "float32", default) == "lut_accuracy_cpu_ort_b8_t2"
    assert result_name("cpu", "openvino", 1, 1, "bfloat16", ["resnet20"]) == \
        "lut_accuracy_cpu_openvino_b1_bfloat16_resnet20"
