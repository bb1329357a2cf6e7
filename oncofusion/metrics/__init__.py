"""Discrimination and calibration metrics with bootstrap confidence intervals."""
