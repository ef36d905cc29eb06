"""INT8 Q/DQ and FP16 models calibrated on normal images (issue 5: not built yet)."""
