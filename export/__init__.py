"""Workstation side (needs torch): backbones with their pyramid description, ONNX export with
pre-processing and metadata inside the graph, and parity checks against PyTorch. The TensorRT
build needs no torch and runs on the device too: ``engine`` (the build and its sidecar),
``trt_plans`` (what each TensorRT version needs), ``trtexec`` (the same build as a trtexec command
line), ``trt_ops`` (what TensorRT's ONNX parser takes)."""
