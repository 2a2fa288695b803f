"""Stage: exporting a searched config as a plain network to ONNX and the other runtimes' formats."""
