"""Semantic features, report text and zero-shot prompts for nodule vision-language models."""

from .reports import (
    SEMANTIC_OPTIONS,
    augment_report,
    build_report,
    semantic_features,
    zero_shot_prompts,
)

__all__ = ["SEMANTIC_OPTIONS", "augment_report", "build_report", "semantic_features", "zero_shot_prompts"]
