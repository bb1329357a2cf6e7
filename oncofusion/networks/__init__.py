"""Encoders, pooling, fusion blocks and heads; one file a network family."""
