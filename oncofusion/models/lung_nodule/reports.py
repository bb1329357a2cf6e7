"""Semantic nodule features and the radiology-style text built from them.

The paper turns structured semantic features into short reports with an LLM; here deterministic
templates with random phrasing and finding order do the same job reproducibly and offline: the same
generator seed gives the same text. The model trains on the impression; :func:`augment_report` adds
the authors' synonym swaps and random word crop.
"""

from __future__ import annotations

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

_ZERO_SHOT: dict[str, dict[str, str]] = {
    "shape": {"round": "The nodule is round.", "irregular": "The nodule is ovoid or irregular in shape."},
    "margin": {
        "well-defined": "The nodule has a well-defined margin.",
        "poorly defined": "The nodule has a poorly defined margin.",
    },
    "lobulation": {
        "lobulated": "The nodule has a lobulated contour.",
        "not lobulated": "The nodule has a smooth, non-lobulated contour.",
    },
    "spiculation": {
        "spiculated": "The nodule has a spiculated margin.",
        "not spiculated": "The nodule has a smooth margin.",
    },
    "texture": {
        "ground-glass": "The nodule is a pure ground-glass nodule.",
        "part-solid": "The nodule is a part-solid nodule.",
        "solid": "The nodule is a solid nodule.",
    },
    "calcification": {
        "absent": "The nodule has no calcification.",
        "present": "The nodule has a central or diffuse calcification.",
        "eccentric": "The nodule has an eccentric calcification.",
    },
    "internal_structure": {
        "soft tissue": "The nodule has soft-tissue internal structure.",
        "cyst-like": "The nodule has a cyst-like internal structure.",
    },
}

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

# Impression fragments: terse phrases that summarise every feature.
_IMPRESSION_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {"round": ("Round", "Rounded"), "irregular": ("Irregular", "Ovoid-to-irregular")},
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
_IMPRESSION_VERBS: tuple[str, ...] = (
    "It shows {} and {}.",
    "There is {} and {}.",
    "It demonstrates {} and {}.",
)

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


def zero_shot_prompts() -> dict[str, dict[str, str]]:
    """One sentence per option of every feature, for zero-shot classification by text similarity."""
    return {feature: dict(prompts) for feature, prompts in _ZERO_SHOT.items()}


def _validate_features(features: Mapping[str, str]) -> None:
    """Reject unknown features and options early, naming them, rather than failing in a template."""
    for feature, options in SEMANTIC_OPTIONS.items():
        if feature not in features:
            raise ValueError(f"features lack '{feature}' (options: {options})")
        if features[feature] not in options:
            raise ValueError(
                f"feature '{feature}' has unknown option '{features[feature]}' (options: {options})"
            )


def _findings(features: Mapping[str, str], rng: np.random.Generator) -> str:
    """Introductory sentence, then one sentence per feature in random order."""
    order = rng.permutation(len(SEMANTIC_OPTIONS))
    names = list(SEMANTIC_OPTIONS)
    sentences = [_pick(_INTRO, rng)]
    sentences += [_pick(_FINDINGS[names[i]][features[names[i]]], rng) for i in order]
    return " ".join(sentences)


def _impression(features: Mapping[str, str], rng: np.random.Generator) -> str:
    """A terse summary that still names every feature, since the model trains on it alone."""

    def word(feature: str) -> str:
        return _pick(_IMPRESSION_WORDS[feature][features[feature]], rng)

    head = f"{word('shape')} {word('texture')} pulmonary nodule with {word('margin')}."
    contour = _pick(_IMPRESSION_VERBS, rng).format(word("lobulation"), word("spiculation"))
    tail = [word("calcification"), word("internal_structure")]
    if rng.random() < 0.5:
        tail.reverse()
    return " ".join([head, contour, *tail])


def build_report(features: Mapping[str, str], rng: np.random.Generator) -> dict[str, str]:
    """Write a findings + impression report for one nodule from its semantic features.

    Returns ``{"findings", "impression", "text"}`` where ``text`` is
    ``"Findings: <findings> Impression: <impression>"``. Phrasing and finding order are random but
    drawn only from ``rng``, so a fixed seed reproduces the text exactly.
    """
    _validate_features(features)
    findings = _findings(features, rng)
    impression = _impression(features, rng)
    return {
        "findings": findings,
        "impression": impression,
        "text": f"Findings: {findings} Impression: {impression}",
    }


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
