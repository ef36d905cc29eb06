"""Workstation side (needs torch): backbones with their pyramid description, ONNX export with
pre-processing and metadata inside the graph, and parity checks against PyTorch."""
