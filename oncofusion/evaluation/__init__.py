"""Batch prediction over a datalist and the evaluation report built from it."""
