"""Semantic features from LIDC ratings, report text, zero-shot prompts and text augmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from oncofusion.models.lung_nodule.reports import (
    SEMANTIC_OPTIONS,
    augment_report,
    build_report,
    crop_words,
    semantic_features,
    swap_synonyms,
    zero_shot_prompts,
)
from oncofusion.models.lung_nodule.text_augment import RandReportAugmentd

NEUTRAL = {
    "subtlety": 3.0,
    "internalStructure": 1.0,
    "calcification": 6.0,
    "sphericity": 3.0,
    "margin": 3.0,
    "lobulation": 1.0,
    "spiculation": 1.0,
    "texture": 5.0,
}

# Words by which a reader recognises each feature in the text, whatever the option.
FEATURE_CUES = {
    "shape": ("round", "irregular"),
    "margin": ("margin", "border"),
    "lobulation": ("lobulat",),
    "spiculation": ("spicul",),
    "texture": ("ground-glass", "solid"),
    "calcification": ("calcif",),
    "internal_structure": ("internal",),
}


def _features(**ratings: float) -> dict[str, str]:
    return semantic_features({**NEUTRAL, **ratings})


@pytest.mark.parametrize(
    ("rating", "value", "feature", "option"),
    [
        ("sphericity", 3.0, "shape", "irregular"),
        ("sphericity", 3.5, "shape", "round"),
        ("margin", 2.5, "margin", "poorly defined"),
        ("margin", 3.0, "margin", "well-defined"),
        ("lobulation", 2.5, "lobulation", "not lobulated"),
        ("lobulation", 3.0, "lobulation", "lobulated"),
        ("spiculation", 2.5, "spiculation", "not spiculated"),
        ("spiculation", 3.0, "spiculation", "spiculated"),
        ("texture", 1.5, "texture", "ground-glass"),
        ("texture", 2.0, "texture", "part-solid"),
        ("texture", 4.0, "texture", "part-solid"),
        ("texture", 4.5, "texture", "solid"),
        ("calcification", 6.0, "calcification", "absent"),
        ("calcification", 4.0, "calcification", "eccentric"),
        ("calcification", 3.0, "calcification", "present"),
        ("calcification", 5.0, "calcification", "present"),
        ("internalStructure", 4.0, "internal_structure", "cyst-like"),
        ("internalStructure", 1.0, "internal_structure", "soft tissue"),
        ("internalStructure", 2.0, "internal_structure", "soft tissue"),
    ],
)
def test_spec_mapping_at_boundaries(rating, value, feature, option):
    assert _features(**{rating: value})[feature] == option


def test_features_cover_the_options_table():
    features = _features()
    assert set(features) == set(SEMANTIC_OPTIONS)
    assert all(features[f] in SEMANTIC_OPTIONS[f] for f in features)


def test_missing_rating_is_named():
    ratings = dict(NEUTRAL)
    del ratings["spiculation"]
    with pytest.raises(ValueError, match="spiculation"):
        semantic_features(ratings)


def test_zero_shot_prompts_one_sentence_per_option():
    prompts = zero_shot_prompts()
    assert set(prompts) == set(SEMANTIC_OPTIONS)
    for feature, options in SEMANTIC_OPTIONS.items():
        assert set(prompts[feature]) == set(options)
        sentences = list(prompts[feature].values())
        assert len(set(sentences)) == len(sentences)
        assert all(s.startswith("The nodule") and s.endswith(".") for s in sentences)
    assert prompts["spiculation"]["spiculated"] == "The nodule has a spiculated margin."
    assert prompts["spiculation"]["not spiculated"] == "The nodule has a smooth margin."


def test_report_is_deterministic_per_seed():
    features = _features(spiculation=4, texture=3)
    first = build_report(features, np.random.default_rng(7))
    again = build_report(features, np.random.default_rng(7))
    assert first == again
    others = {build_report(features, np.random.default_rng(s))["text"] for s in range(20)}
    assert len(others) > 10  # phrasing and order really vary between seeds


def test_report_layout():
    report = build_report(_features(), np.random.default_rng(0))
    assert report["text"] == f"Findings: {report['findings']} Impression: {report['impression']}"


def _all_combinations():
    names = list(SEMANTIC_OPTIONS)
    for combo in itertools.product(*SEMANTIC_OPTIONS.values()):
        yield dict(zip(names, combo, strict=True))


def test_report_and_impression_mention_every_feature():
    rng = np.random.default_rng(0)
    for features in _all_combinations():
        report = build_report(features, rng)
        for part in ("findings", "impression"):
            text = report[part].lower()
            for feature, cues in FEATURE_CUES.items():
                assert any(cue in text for cue in cues), (part, feature, report[part])


def test_report_distinguishes_options():
    rng = np.random.default_rng(0)
    spiculated = build_report(_features(spiculation=5), rng)["impression"].lower()
    smooth = build_report(_features(spiculation=1), rng)["impression"].lower()
    assert "no spicul" in smooth and "no spicul" not in spiculated
    ggo = build_report(_features(texture=1), rng)["impression"].lower()
    assert "ground-glass" in ggo and "part-solid" not in ggo


def test_unknown_option_is_rejected():
    features = _features()
    features["margin"] = "fuzzy"
    with pytest.raises(ValueError, match="margin"):
        build_report(features, np.random.default_rng(0))


def test_synonym_swap_keeps_meaning_and_case():
    rng = np.random.default_rng(3)
    swapped = {swap_synonyms("The margin shows lobulation. Margin is smooth.", rng) for _ in range(30)}
    assert len(swapped) > 1
    for text in swapped:
        first, second = text.split(". ")
        assert first.split()[1] in ("margin", "border", "boundary")
        assert second.split()[0] in ("Margin", "Border", "Boundary")


def test_word_crop_drops_one_short_span():
    text = "one two three four five six seven eight"
    for seed in range(20):
        cropped = crop_words(text, np.random.default_rng(seed)).split()
        assert 5 <= len(cropped) <= 7
        assert " ".join(cropped) in {
            " ".join(text.split()[:s] + text.split()[s + n :]) for n in (1, 2, 3) for s in range(8)
        }
    assert crop_words("too short", np.random.default_rng(0)) == "too short"


def test_augment_probability_extremes():
    text = build_report(_features(spiculation=5), np.random.default_rng(0))["impression"]
    assert augment_report(text, np.random.default_rng(0), p=0.0) == text
    changed = [augment_report(text, np.random.default_rng(s), p=1.0) != text for s in range(20)]
    assert all(changed)
    with pytest.raises(ValueError):
        augment_report(text, np.random.default_rng(0), p=1.5)


def test_rand_report_augmentd_is_reproducible():
    text = build_report(_features(lobulation=4), np.random.default_rng(0))["impression"]
    data = {"report": text, "label": 1}
    a = RandReportAugmentd(keys="report", prob=1.0).set_random_state(5)
    b = RandReportAugmentd(keys="report", prob=1.0).set_random_state(5)
    out_a = [a(data)["report"] for _ in range(5)]
    out_b = [b(data)["report"] for _ in range(5)]
    assert out_a == out_b
    assert all(o != text for o in out_a) and len(set(out_a)) > 1
    assert a(data)["label"] == 1 and data["report"] == text  # input left untouched
    off = RandReportAugmentd(keys="report", prob=0.0)
    assert off(data)["report"] == text


def test_rand_report_augmentd_rejects_non_strings():
    with pytest.raises(TypeError, match="report"):
        RandReportAugmentd(keys="report", prob=1.0)({"report": 3})
