"""Semantic nodule features and the radiology-style text built from them.

The paper turns structured semantic features into short reports with an LLM; here deterministic
templates with random phrasing and finding order do the same job reproducibly and offline: the same
generator seed gives the same text. The model trains on the impression; :func:`augment_report` adds
the authors' synonym swaps and random word crop.

Two report builders:

- :func:`build_report` (the default) follows the authors: the coarse semantic options of
  :func:`semantic_features` plus the nodule's greatest diameter (their LIDC table carries the median
  over readers of pylidc's diameter, and their augmentation swaps "mm"/"millimeter" and
  "greatest"/"longest"/"maximum", so the size is in their text).
- :func:`build_graded_report` is our departure: it keeps the five steps of every ordinal LIDC rating
  ("no", "minimal", "mild", "moderate", "marked" spiculation ...), the six calcification patterns, the
  four internal structures and the subtlety, plus the diameter. On the real LIDC annotations the graded
  text carries more of the readers' malignancy call than the coarse one (``bench/lidc_benchmark.py``).

Zero-shot prompts (:func:`zero_shot_prompts`) are built by the default impression template with only
one feature's words filled in, so every prompt is a fragment of a sentence the model trained on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

# Every semantic feature and its options, in one place: the report templates, the zero-shot prompts and
# the mapping from LIDC ratings all key on these names.
SEMANTIC_OPTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("round", "irregular"),
    "margin": ("well-defined", "poorly defined"),
    "lobulation": ("lobulated", "not lobulated"),
    "spiculation": ("spiculated", "not spiculated"),
    "texture": ("ground-glass", "part-solid", "solid"),
    "calcification": ("absent", "present", "eccentric"),
    "internal_structure": ("soft tissue", "cyst-like"),
}

# LIDC ratings each feature is derived from (see semantic_features).
_RATING_OF_FEATURE: dict[str, str] = {
    "shape": "sphericity",
    "margin": "margin",
    "lobulation": "lobulation",
    "spiculation": "spiculation",
    "texture": "texture",
    "calcification": "calcification",
    "internal_structure": "internalStructure",
}
_LIDC_CALCIFICATION_ABSENT = 6
_LIDC_CALCIFICATION_ECCENTRIC = 4  # "non-central" in LIDC; the spec calls it eccentric
_LIDC_INTERNAL_AIR = 4  # "air" in LIDC; the spec calls it cyst-like

# Finding sentences: several phrasings per option, chosen at random.
_FINDINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "round": (
            "The nodule is round.",
            "The lesion has a round, spherical configuration.",
            "It is rounded in shape.",
        ),
        "irregular": (
            "The nodule is ovoid to irregular in shape.",
            "The lesion has an irregular, non-spherical shape.",
            "It is irregular in shape.",
        ),
    },
    "margin": {
        "well-defined": (
            "Its margin is well defined.",
            "The border is sharply circumscribed.",
            "The margins are well defined.",
        ),
        "poorly defined": (
            "Its margin is poorly defined.",
            "The border is indistinct and poorly defined.",
            "The margins are ill-defined.",
        ),
    },
    "lobulation": {
        "lobulated": (
            "The contour is lobulated.",
            "There is lobulation of the outline.",
            "The lesion shows a lobulated contour.",
        ),
        "not lobulated": (
            "There is no lobulation.",
            "The contour is not lobulated.",
            "The lesion shows no lobulation.",
        ),
    },
    "spiculation": {
        "spiculated": (
            "Spiculation is present along the margin.",
            "The nodule shows spiculated margins.",
            "Radiating spicules extend from the border, in keeping with spiculation.",
        ),
        "not spiculated": (
            "No spiculation is seen.",
            "There are no spicules; the nodule is not spiculated.",
            "The margin shows no spiculation.",
        ),
    },
    "texture": {
        "ground-glass": (
            "It is a pure ground-glass nodule.",
            "The attenuation is ground-glass.",
            "It demonstrates ground-glass opacity without a solid component.",
        ),
        "part-solid": (
            "It is part-solid, with a solid component within ground-glass opacity.",
            "The attenuation is mixed, part-solid.",
            "A solid core is surrounded by ground-glass opacity, a part-solid pattern.",
        ),
        "solid": (
            "It is solid in attenuation.",
            "The nodule is of solid soft-tissue attenuation.",
            "The attenuation is solid.",
        ),
    },
    "calcification": {
        "absent": (
            "No calcification is identified.",
            "There is no calcification.",
            "The nodule is non-calcified, with no calcification.",
        ),
        "present": (
            "Calcification is present within the nodule.",
            "The nodule contains dense calcification.",
            "A calcification is seen within the lesion.",
        ),
        "eccentric": (
            "An eccentric calcification is present.",
            "Calcification is seen eccentrically.",
            "There is an eccentric focus of calcification.",
        ),
    },
    "internal_structure": {
        "soft tissue": (
            "The internal structure is soft tissue.",
            "Internal density is that of soft tissue.",
            "The internal structure shows soft tissue.",
        ),
        "cyst-like": (
            "The internal structure is cyst-like.",
            "It has a cyst-like, air-containing internal component.",
            "The internal structure shows a cyst-like component.",
        ),
    },
}

_INTRO: tuple[str, ...] = (
    "A pulmonary nodule is present.",
    "There is a pulmonary nodule.",
    "A nodule is seen in the lung.",
)

# Impression fragments: terse phrases that summarise every feature. The first phrasing of each option
# also words its zero-shot prompt.
IMPRESSION_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {"round": ("round", "rounded"), "irregular": ("irregular", "ovoid-to-irregular")},
    "texture": {
        "ground-glass": ("pure ground-glass", "ground-glass"),
        "part-solid": ("part-solid", "mixed part-solid"),
        "solid": ("solid",),
    },
    "margin": {
        "well-defined": ("well-defined margins", "sharply circumscribed margins"),
        "poorly defined": ("poorly defined margins", "ill-defined margins"),
    },
    "lobulation": {"lobulated": ("lobulation", "a lobulated contour"), "not lobulated": ("no lobulation",)},
    "spiculation": {
        "spiculated": ("spiculation", "spiculated borders"),
        "not spiculated": ("no spiculation",),
    },
    "calcification": {
        "absent": ("No calcification.", "Non-calcified."),
        "present": ("Calcification present.", "Contains calcification."),
        "eccentric": ("Eccentric calcification.", "Eccentric calcification present."),
    },
    "internal_structure": {
        "soft tissue": ("Soft-tissue internal structure.", "Internal structure of soft tissue."),
        "cyst-like": ("Cyst-like internal structure.", "Internal structure is cyst-like."),
    },
}
# Filled with "<lobulation> and <spiculation>", or one of them alone in a zero-shot prompt.
_IMPRESSION_VERBS: tuple[str, ...] = (
    "It shows {}.",
    "There is {}.",
    "It demonstrates {}.",
)
# The size sentence of the findings, filled with size_text(); "greatest" is swapped with "longest" and
# "maximum", "mm" with "millimeter", by the augmentation.
_SIZE_FINDINGS: tuple[str, ...] = (
    "It measures {} in greatest diameter.",
    "The greatest diameter is {}.",
    "Its greatest diameter measures {}.",
)

# Graded report (our departure): words for levels 1..5 of each ordinal LIDC rating. LIDC's anchors are
# sphericity 1 linear / 3 ovoid / 5 round, margin 1 poorly defined / 5 sharp, lobulation and spiculation
# 1 none / 5 marked, texture 1 non-solid (ground-glass) / 3 part solid / 5 solid, subtlety 1 extremely
# subtle / 5 obvious; the steps between are worded so that their order reads off the words.
GRADED_WORDS: dict[str, tuple[str, str, str, str, str]] = {
    "sphericity": ("linear", "linear-to-ovoid", "ovoid", "ovoid-to-round", "round"),
    "texture": ("pure ground-glass", "mostly ground-glass", "part-solid", "mostly solid", "solid"),
    "margin": ("very poorly defined", "poorly defined", "moderately defined", "well-defined", "sharply defined"),
    "lobulation": ("no", "minimal", "mild", "moderate", "marked"),
    "spiculation": ("no", "minimal", "mild", "moderate", "marked"),
    "subtlety": ("extremely subtle", "moderately subtle", "fairly subtle", "moderately obvious", "obvious"),
}
_GRADED_FINDINGS: dict[str, tuple[str, ...]] = {
    "sphericity": ("The nodule is {} in shape.", "Its shape is {}."),
    "texture": ("The attenuation is {}.", "It is {} in attenuation."),
    "margin": ("Its margin is {}.", "The margins are {}."),
    "lobulation": ("There is {} lobulation.", "The contour shows {} lobulation."),
    "spiculation": ("There is {} spiculation.", "The margin shows {} spiculation."),
    "subtlety": ("The nodule is {}.", "It is {} on the scan."),
}
# LIDC calcification codes 1..6 and internal structure codes 1..4, as sentences.
_GRADED_CALCIFICATION: dict[int, str] = {
    1: "Popcorn calcification.",
    2: "Laminated calcification.",
    3: "Solid calcification.",
    4: "Eccentric calcification.",
    5: "Central calcification.",
    6: "No calcification.",
}
_GRADED_INTERNAL: dict[int, str] = {
    1: "Soft-tissue internal structure.",
    2: "Fluid internal structure.",
    3: "Fat internal structure.",
    4: "Cyst-like, air-containing internal structure.",
}

# Reserved synonym groups for augmentation: any member may be swapped for any other of its group.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("margin", "border", "boundary"),
    ("margins", "borders", "boundaries"),
    ("shows", "demonstrates", "exhibits"),
    ("nodule", "lesion"),
    ("present", "seen", "identified"),
    ("contour", "outline"),
    ("contains", "includes"),
    ("rounded", "round", "spherical"),
    ("ill-defined", "indistinct", "blurred"),
    ("irregular", "uneven"),
    ("attenuation", "density"),
    ("focus", "spot"),
    ("mm", "millimeter"),  # the authors' size synonyms
    ("greatest", "longest", "maximum"),
)
_SYNONYM_GROUP: dict[str, tuple[str, ...]] = {w: group for group in SYNONYMS for w in group}
_SYNONYM_PATTERN = re.compile(
    r"\b(" + "|".join(re.escape(w) for w in sorted(_SYNONYM_GROUP, key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    """One phrasing at random."""
    return options[int(rng.integers(len(options)))]


def _rating(ratings: Mapping[str, float], name: str) -> float:
    """A rating by LIDC name, with an error that says which one is missing."""
    if name not in ratings:
        raise ValueError(f"ratings lack '{name}' (have: {sorted(ratings)})")
    return float(ratings[name])


def semantic_features(ratings: Mapping[str, float]) -> dict[str, str]:
    """Map aggregated LIDC ratings to the spec's semantic options (see :data:`SEMANTIC_OPTIONS`).

    Thresholds follow the spec: round if sphericity > 3; well-defined if margin >= 3; lobulated and
    spiculated at >= 3; texture < 2 ground-glass, > 4 solid, otherwise part-solid; calcification 6 is
    absent and 4 (non-central) eccentric, any other pattern present; internal structure 4 (air) is
    cyst-like, anything else soft tissue.
    """
    r = {feature: _rating(ratings, name) for feature, name in _RATING_OF_FEATURE.items()}
    return {
        "shape": "round" if r["shape"] > 3 else "irregular",
        "margin": "well-defined" if r["margin"] >= 3 else "poorly defined",
        "lobulation": "lobulated" if r["lobulation"] >= 3 else "not lobulated",
        "spiculation": "spiculated" if r["spiculation"] >= 3 else "not spiculated",
        "texture": _texture(r["texture"]),
        "calcification": _calcification(r["calcification"]),
        "internal_structure": _internal_structure(r["internal_structure"]),
    }


def _texture(rating: float) -> str:
    """Texture rating 1 (non-solid) .. 5 (solid): below 2 ground-glass, above 4 solid, else part-solid."""
    if rating < 2:
        return "ground-glass"
    return "solid" if rating > 4 else "part-solid"


def _internal_structure(code: float) -> str:
    """LIDC internal structure code: 4 (air) is cyst-like; soft tissue, fluid and fat read as soft tissue."""
    return "cyst-like" if round(code) == _LIDC_INTERNAL_AIR else "soft tissue"


def _calcification(code: float) -> str:
    """LIDC calcification code: 6 absent, 4 (non-central) eccentric, other patterns present."""
    code = round(code)
    if code == _LIDC_CALCIFICATION_ABSENT:
        return "absent"
    return "eccentric" if code == _LIDC_CALCIFICATION_ECCENTRIC else "present"


def _validate_features(features: Mapping[str, str]) -> None:
    """Reject unknown features and options early, naming them, rather than failing in a template."""
    for feature, options in SEMANTIC_OPTIONS.items():
        if feature not in features:
            raise ValueError(f"features lack '{feature}' (options: {options})")
        if features[feature] not in options:
            raise ValueError(
                f"feature '{feature}' has unknown option '{features[feature]}' (options: {options})"
            )


def size_text(diameter_mm: float) -> str:
    """The diameter as the reports write it: whole millimetres in digits, e.g. ``"12 mm"``.

    Whole millimetres: a reader's diameter varies by more than that between readers, and a short digit
    string is one token for the text encoder.
    """
    if isinstance(diameter_mm, bool) or not isinstance(diameter_mm, int | float) or not math.isfinite(diameter_mm):
        raise ValueError(f"diameter_mm must be a finite number of millimetres, got {diameter_mm!r}")
    if diameter_mm <= 0:
        raise ValueError(f"diameter_mm must be positive, got {diameter_mm}; pass None when it is unknown")
    return f"{max(1, math.floor(diameter_mm + 0.5))} mm"


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _impression_text(words: Mapping[str, str], size: str | None, verb: str, tail_first: str) -> str:
    """The impression template: ``"<size> <shape> <texture> pulmonary nodule with <margin>. It shows
    <lobulation> and <spiculation>. <calcification> <internal structure>"``.

    Any feature absent from ``words`` (and the size when ``size`` is None) is left out with its
    connecting words, so the zero-shot prompts come from this same template with one feature filled in.
    ``tail_first`` names which of calcification and internal structure comes first.
    """
    head = " ".join(w for w in (size, words.get("shape"), words.get("texture"), "pulmonary nodule") if w)
    if "margin" in words:
        head += f" with {words['margin']}"
    sentences = [_capitalise(head) + "."]
    contour = [words[f] for f in ("lobulation", "spiculation") if f in words]
    if contour:
        sentences.append(verb.format(" and ".join(contour)))
    tail = ["calcification", "internal_structure"]
    if tail_first != tail[0]:
        tail.reverse()
    sentences += [words[f] for f in tail if f in words]
    return " ".join(sentences)


def zero_shot_prompts() -> dict[str, dict[str, str]]:
    """One prompt per option of every feature: the default impression template with only that feature's
    words (their first phrasing), e.g. ``"Pulmonary nodule. It shows no spiculation."``.

    Every prompt is a fragment of the impressions the model trains on, and the prompts of one feature
    differ only in that feature's words, so no two features share a prompt.
    """
    verb = _IMPRESSION_VERBS[0]
    return {
        feature: {
            option: _impression_text({feature: words[0]}, None, verb, "calcification")
            for option, words in options.items()
        }
        for feature, options in IMPRESSION_WORDS.items()
    }


def _optional_size(diameter_mm: float | None) -> str | None:
    return None if diameter_mm is None else size_text(diameter_mm)


def _findings(features: Mapping[str, str], size: str | None, rng: np.random.Generator) -> str:
    """Introductory sentence, the size, then one sentence per feature in random order."""
    order = rng.permutation(len(SEMANTIC_OPTIONS))
    names = list(SEMANTIC_OPTIONS)
    sentences = [_pick(_INTRO, rng)]
    if size is not None:
        sentences.append(_pick(_SIZE_FINDINGS, rng).format(size))
    sentences += [_pick(_FINDINGS[names[i]][features[names[i]]], rng) for i in order]
    return " ".join(sentences)


def _impression(features: Mapping[str, str], size: str | None, rng: np.random.Generator) -> str:
    """A terse summary that still names every feature and the size, since the model trains on it alone."""
    words = {feature: _pick(IMPRESSION_WORDS[feature][features[feature]], rng) for feature in SEMANTIC_OPTIONS}
    verb = _pick(_IMPRESSION_VERBS, rng)
    tail_first = "internal_structure" if rng.random() < 0.5 else "calcification"
    return _impression_text(words, size, verb, tail_first)


def _report(findings: str, impression: str) -> dict[str, str]:
    return {"findings": findings, "impression": impression, "text": f"Findings: {findings} Impression: {impression}"}


def build_report(
    features: Mapping[str, str], rng: np.random.Generator, *, diameter_mm: float | None
) -> dict[str, str]:
    """Write the authors'-style findings + impression report for one nodule.

    ``features`` are the coarse semantic options (:func:`semantic_features`); ``diameter_mm`` is the
    nodule's greatest diameter (for LIDC, the median over readers), written as in :func:`size_text` in
    both findings and impression; pass None only where no size is known (the text then has none).

    Returns ``{"findings", "impression", "text"}`` where ``text`` is
    ``"Findings: <findings> Impression: <impression>"``. Phrasing and finding order are random but
    drawn only from ``rng``, so a fixed seed reproduces the text exactly.
    """
    _validate_features(features)
    size = _optional_size(diameter_mm)
    findings = _findings(features, size, rng)
    return _report(findings, _impression(features, size, rng))


def graded_levels(ratings: Mapping[str, float]) -> dict[str, int]:
    """The LIDC ratings the graded report words: ordinal medians rounded half up to 1..5, and the codes
    of calcification (1..6) and internal structure (1..4)."""
    levels = {}
    for name in GRADED_WORDS:
        value = _rating(ratings, name)
        if not 1 <= value <= 5:
            raise ValueError(f"rating '{name}' must lie in [1, 5], got {value}")
        levels[name] = math.floor(value + 0.5)
    for name, table in (("calcification", _GRADED_CALCIFICATION), ("internalStructure", _GRADED_INTERNAL)):
        code = round(_rating(ratings, name))
        if code not in table:
            raise ValueError(f"rating '{name}' has unknown LIDC code {code} (codes: {sorted(table)})")
        levels[name] = code
    return levels


def _graded_findings(levels: Mapping[str, int], size: str | None, rng: np.random.Generator) -> str:
    sentences = []
    for name in GRADED_WORDS:
        sentences.append(_pick(_GRADED_FINDINGS[name], rng).format(GRADED_WORDS[name][levels[name] - 1]))
    sentences.append(_GRADED_CALCIFICATION[levels["calcification"]])
    sentences.append(_GRADED_INTERNAL[levels["internalStructure"]])
    order = rng.permutation(len(sentences))
    head = [_pick(_INTRO, rng)]
    if size is not None:
        head.append(_pick(_SIZE_FINDINGS, rng).format(size))
    return " ".join(head + [_capitalise(sentences[i]) for i in order])


def _graded_impression(levels: Mapping[str, int], size: str | None, rng: np.random.Generator) -> str:
    """The default impression template with five-level words, then the subtlety."""

    def word(name: str) -> str:
        return GRADED_WORDS[name][levels[name] - 1]

    words = {
        "shape": word("sphericity"),
        "texture": word("texture"),
        "margin": f"{word('margin')} margins",
        "lobulation": f"{word('lobulation')} lobulation",
        "spiculation": f"{word('spiculation')} spiculation",
        "calcification": _GRADED_CALCIFICATION[levels["calcification"]],
        "internal_structure": _GRADED_INTERNAL[levels["internalStructure"]],
    }
    verb = _pick(_IMPRESSION_VERBS, rng)
    tail_first = "internal_structure" if rng.random() < 0.5 else "calcification"
    text = _impression_text(words, size, verb, tail_first)
    return f"{text} The nodule is {word('subtlety')}."


def build_graded_report(
    ratings: Mapping[str, float], rng: np.random.Generator, *, diameter_mm: float | None
) -> dict[str, str]:
    """Write a report that keeps every step of the LIDC ratings (our departure from the authors).

    ``ratings`` are the aggregated LIDC ratings (median over readers, mode for calcification and
    internal structure); ordinal ones are worded in five levels (:data:`GRADED_WORDS`), calcification
    and internal structure by their LIDC pattern, and the subtlety is added. ``diameter_mm`` and the
    returned keys are as in :func:`build_report`.
    """
    levels = graded_levels(ratings)
    size = _optional_size(diameter_mm)
    findings = _graded_findings(levels, size, rng)
    return _report(findings, _graded_impression(levels, size, rng))


def _match_case(template: str, word: str) -> str:
    """Give a replacement the capitalisation of the word it replaces."""
    return word[:1].upper() + word[1:] if template[:1].isupper() else word


def swap_synonyms(text: str, rng: np.random.Generator) -> str:
    """Replace every word of the reserved synonym table by a random member of its group."""

    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        return _match_case(found, _pick(_SYNONYM_GROUP[found.lower()], rng))

    return _SYNONYM_PATTERN.sub(replace, text)


def crop_words(text: str, rng: np.random.Generator, max_span: int = 3, min_keep: int = 4) -> str:
    """Drop one contiguous span of 1..max_span words, keeping at least ``min_keep`` words."""
    words = text.split()
    span = int(rng.integers(1, max_span + 1))
    if len(words) - span < min_keep:
        return text
    start = int(rng.integers(0, len(words) - span + 1))
    return " ".join(words[:start] + words[start + span :])


def augment_report(text: str, rng: np.random.Generator, p: float = 0.5) -> str:
    """Training-time text augmentation: synonym swap, then word crop, each with probability ``p``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augmentation probability p must lie in [0, 1], got {p}")
    if rng.random() < p:
        text = swap_synonyms(text, rng)
    if rng.random() < p:
        text = crop_words(text, rng)
    return text
