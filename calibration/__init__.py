"""Reduced-precision models for the edge: INT8 Q/DQ calibrated on normal images (``int8``, or
NVIDIA ModelOpt in ``modelopt``), FP16 (``fp16``), the calibration image reader (``reader``) and
the drift report against fp32 (``drift``)."""
