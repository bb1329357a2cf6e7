"""Readers of every input kind (3D volumes, 2D frames, whole-slide images) and the decoded-image cache."""
