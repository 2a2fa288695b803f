"""Programs a runtime runs, built from the core's plain networks: ONNX files, TensorRT
engines, OpenVINO IR and ExecuTorch programs; their dependencies are imported lazily.

Export and the profilers (profilers/) both build with these; they import only the core."""
