"""Calibration data and distillation helpers shared by the data-aware codecs."""
