"""Semantic features from LIDC ratings, report text (authors' and graded), zero-shot prompts and their
evaluation, and text augmentation."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from oncofusion.models.lung_nodule.evaluation import zero_shot_auroc, zero_shot_section
from oncofusion.models.lung_nodule.reports import (
    GRADED_WORDS,
    IMPRESSION_WORDS,
    SEMANTIC_OPTIONS,
    augment_report,
    build_graded_report,
    build_report,
    crop_words,
    graded_levels,
    semantic_features,
    size_text,
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
DIAMETER = 12.3  # mm; written "12 mm"

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
        assert all(s[:1].isupper() and s.endswith(".") for s in sentences)


def test_zero_shot_prompts_differ_only_in_the_option_words():
    prompts = zero_shot_prompts()
    for feature, options in prompts.items():
        # Blank out each prompt's own option words: what is left must be one template per feature.
        templates = set()
        for option, prompt in options.items():
            word = IMPRESSION_WORDS[feature][option][0].lower()
            assert word in prompt.lower(), (feature, option, prompt)
            templates.add(prompt.lower().replace(word, "<option>", 1))
        assert len(templates) == 1, (feature, templates)
    every = [p for options in prompts.values() for p in options.values()]
    assert len(set(every)) == len(every)  # no two features share a prompt


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z-]+", text.lower()))


def test_zero_shot_prompts_are_fragments_of_training_impressions():
    # Every word of a prompt occurs in the impressions of nodules that have that option.
    rng = np.random.default_rng(0)
    for feature, options in zero_shot_prompts().items():
        for option, prompt in options.items():
            seen = set()
            for features in _all_combinations():
                if features[feature] == option:
                    seen |= _words(build_report(features, rng, diameter_mm=DIAMETER)["impression"])
            assert _words(prompt) <= seen, (feature, option, prompt)


def test_report_is_deterministic_per_seed():
    features = _features(spiculation=4, texture=3)
    first = build_report(features, np.random.default_rng(7), diameter_mm=DIAMETER)
    again = build_report(features, np.random.default_rng(7), diameter_mm=DIAMETER)
    assert first == again
    others = {build_report(features, np.random.default_rng(s), diameter_mm=DIAMETER)["text"] for s in range(20)}
    assert len(others) > 10  # phrasing and order really vary between seeds


def test_report_layout():
    report = build_report(_features(), np.random.default_rng(0), diameter_mm=DIAMETER)
    assert report["text"] == f"Findings: {report['findings']} Impression: {report['impression']}"


def _all_combinations():
    names = list(SEMANTIC_OPTIONS)
    for combo in itertools.product(*SEMANTIC_OPTIONS.values()):
        yield dict(zip(names, combo, strict=True))


def test_report_and_impression_mention_every_feature():
    rng = np.random.default_rng(0)
    for features in _all_combinations():
        report = build_report(features, rng, diameter_mm=DIAMETER)
        for part in ("findings", "impression"):
            text = report[part].lower()
            for feature, cues in FEATURE_CUES.items():
                assert any(cue in text for cue in cues), (part, feature, report[part])


def test_report_distinguishes_options():
    rng = np.random.default_rng(0)
    spiculated = build_report(_features(spiculation=5), rng, diameter_mm=DIAMETER)["impression"].lower()
    smooth = build_report(_features(spiculation=1), rng, diameter_mm=DIAMETER)["impression"].lower()
    assert "no spicul" in smooth and "no spicul" not in spiculated
    ggo = build_report(_features(texture=1), rng, diameter_mm=DIAMETER)["impression"].lower()
    assert "ground-glass" in ggo and "part-solid" not in ggo


def test_unknown_option_is_rejected():
    features = _features()
    features["margin"] = "fuzzy"
    with pytest.raises(ValueError, match="margin"):
        build_report(features, np.random.default_rng(0), diameter_mm=DIAMETER)


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
    text = build_report(_features(spiculation=5), np.random.default_rng(0), diameter_mm=DIAMETER)["impression"]
    assert augment_report(text, np.random.default_rng(0), p=0.0) == text
    changed = [augment_report(text, np.random.default_rng(s), p=1.0) != text for s in range(20)]
    assert all(changed)
    with pytest.raises(ValueError):
        augment_report(text, np.random.default_rng(0), p=1.5)


def test_rand_report_augmentd_is_reproducible():
    text = build_report(_features(lobulation=4), np.random.default_rng(0), diameter_mm=DIAMETER)["impression"]
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


@pytest.mark.parametrize(("diameter", "text"), [(12.3, "12 mm"), (12.5, "13 mm"), (3.49, "3 mm"), (0.3, "1 mm")])
def test_size_text_rounds_to_whole_millimetres(diameter, text):
    assert size_text(diameter) == text


@pytest.mark.parametrize("bad", [0.0, -4.0, float("nan"), float("inf"), "12", True])
def test_bad_diameter_is_named(bad):
    with pytest.raises(ValueError, match="diameter_mm"):
        build_report(_features(), np.random.default_rng(0), diameter_mm=bad)


def test_size_is_in_findings_and_impression():
    for seed in range(10):
        report = build_report(_features(), np.random.default_rng(seed), diameter_mm=DIAMETER)
        assert report["impression"].startswith("12 mm ")
        assert "12 mm" in report["findings"] and "greatest diameter" in report["findings"]
    without = build_report(_features(), np.random.default_rng(0), diameter_mm=None)
    assert " mm" not in without["text"] and "diameter" not in without["text"]


def test_size_synonyms_are_the_authors():
    swapped = {swap_synonyms("It measures 12 mm in greatest diameter.", np.random.default_rng(s)) for s in range(40)}
    assert {s.split()[5] for s in swapped} == {"greatest", "longest", "maximum"}
    assert {s.split()[3] for s in swapped} == {"mm", "millimeter"}


@pytest.mark.parametrize(("value", "level"), [(1.0, 1), (1.5, 2), (2.5, 3), (3.0, 3), (3.5, 4), (4.5, 5), (5.0, 5)])
def test_graded_levels_round_medians_half_up(value, level):
    assert graded_levels({**NEUTRAL, "spiculation": value})["spiculation"] == level


def test_graded_levels_reject_out_of_range_ratings():
    with pytest.raises(ValueError, match="margin"):
        graded_levels({**NEUTRAL, "margin": 6.0})
    with pytest.raises(ValueError, match="calcification"):
        graded_levels({**NEUTRAL, "calcification": 7.0})
    with pytest.raises(ValueError, match="subtlety"):
        graded_levels({k: v for k, v in NEUTRAL.items() if k != "subtlety"})


def test_graded_impression_words_every_level():
    rng = np.random.default_rng(0)
    for name, words in GRADED_WORDS.items():
        seen = []
        for level, word in enumerate(words, start=1):
            impression = build_graded_report({**NEUTRAL, name: float(level)}, rng, diameter_mm=DIAMETER)["impression"]
            assert impression.startswith("12 mm ")
            seen.append(impression)
            assert word in impression, (name, level, impression)
        assert len(set(seen)) == 5  # five distinct texts per rating
    spiculated = build_graded_report({**NEUTRAL, "spiculation": 5.0}, rng, diameter_mm=DIAMETER)["impression"]
    smooth = build_graded_report({**NEUTRAL, "spiculation": 1.0}, rng, diameter_mm=DIAMETER)["impression"]
    assert "marked spiculation" in spiculated and "no spiculation" in smooth
    assert "Popcorn calcification" in build_graded_report({**NEUTRAL, "calcification": 1.0}, rng,
                                                          diameter_mm=DIAMETER)["impression"]


def test_graded_report_layout_and_determinism():
    ratings = {**NEUTRAL, "lobulation": 4.0}
    first = build_graded_report(ratings, np.random.default_rng(3), diameter_mm=DIAMETER)
    assert first == build_graded_report(ratings, np.random.default_rng(3), diameter_mm=DIAMETER)
    assert first["text"] == f"Findings: {first['findings']} Impression: {first['impression']}"
    assert "moderate lobulation" in first["findings"] and "12 mm" in first["findings"]
    assert "moderately subtle" not in first["text"] and "fairly subtle" in first["text"]  # subtlety 3


# ----------------------------------------------------------------------------- zero-shot evaluation


def _rows(feature: str, truth: list[str], scores: list[dict[str, float]]) -> list[dict]:
    return [{"semantics": {feature: t}, "semantic_features": {feature: s}} for t, s in zip(truth, scores, strict=True)]


def test_zero_shot_auroc_has_a_bootstrap_interval():
    rng = np.random.default_rng(0)
    truth = ["spiculated" if i % 3 == 0 else "not spiculated" for i in range(60)]
    p = [float(np.clip((t == "spiculated") * 0.3 + rng.uniform(0, 0.7), 0, 1)) for t in truth]
    rows = _rows("spiculation", truth, [{"spiculated": v, "not spiculated": 1 - v} for v in p])
    estimate = zero_shot_auroc(rows, "spiculation", num_bootstrap=200)
    expected = roc_auc_score([t == "spiculated" for t in truth], p)
    assert estimate.value == pytest.approx(expected)
    assert estimate.low < estimate.value < estimate.high and estimate.high - estimate.low < 0.5


def test_zero_shot_auroc_macro_over_three_options():
    truth = ["solid", "part-solid", "ground-glass"] * 4
    rng = np.random.default_rng(1)
    scores = [dict(zip(SEMANTIC_OPTIONS["texture"], rng.dirichlet([1, 1, 1]), strict=True)) for _ in truth]
    estimate = zero_shot_auroc(_rows("texture", truth, scores), "texture", num_bootstrap=50)
    expected = np.mean([roc_auc_score([t == o for t in truth], [s[o] for s in scores])
                        for o in SEMANTIC_OPTIONS["texture"]])
    assert estimate.value == pytest.approx(expected)


def test_zero_shot_section_keys_and_unscorable_features():
    rows = _rows("margin", ["well-defined", "poorly defined"] * 5,
                 [{"well-defined": 0.9, "poorly defined": 0.1}, {"well-defined": 0.2, "poorly defined": 0.8}] * 5)
    for row in rows:  # a feature predicted but never recorded cannot be scored
        row["semantic_features"]["shape"] = {"round": 0.5, "irregular": 0.5}
    section = zero_shot_section(rows, num_bootstrap=20)
    assert set(section) == {"margin", "shape"}
    assert section["margin"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert all(np.isnan(v) for v in section["shape"].values())


def test_zero_shot_auroc_names_options_without_a_prompt():
    rows = _rows("margin", ["fuzzy", "well-defined"], [{"well-defined": 0.5, "poorly defined": 0.5}] * 2)
    with pytest.raises(ValueError, match="fuzzy"):
        zero_shot_auroc(rows, "margin")
