"""Patient-grouped, stratified cross-validation folds and the inner validation split.

All cases of a patient share a fold, so that no patient is both trained on and reported on. Folds
are balanced in size and in the target's strata (class, or event indicator for survival), read from
the bundle's :class:`~oncofusion.targets.Target`. Checkpoints are selected on :func:`inner_split` of
the training folds: an out-of-fold figure whose checkpoint was picked on that same fold is optimistic.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from oncofusion.targets import Target

logger = logging.getLogger(__name__)

__all__ = ["assign_folds", "assign_missing_folds", "inner_split"]

FOLD_KEY = "fold"


def _ordered(values: set[Hashable]) -> list[Hashable]:
    """``values`` in a fixed order: sorted when comparable, else by type name and ``repr``."""
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=lambda v: (type(v).__name__, repr(v)))


def _majority(strata: Sequence[Hashable], rank: Mapping[Hashable, int]) -> Hashable:
    """The most common stratum; a tie goes to the one first in ``rank`` (0 before 1 for labels)."""
    counts = Counter(strata)
    return min(counts, key=lambda s: (-counts[s], rank[s]))


def _patient_order(cases: Mapping[Hashable, list[int]], seed: int) -> list[Hashable]:
    """Patients in a seeded random order of their sorted ids, then stably larger first."""
    patients = _ordered(set(cases))
    permutation = np.random.default_rng(seed).permutation(len(patients))
    return sorted((patients[i] for i in permutation), key=lambda p: -len(cases[p]))


def _check_num_folds(num_folds: int) -> None:
    if isinstance(num_folds, bool) or not isinstance(num_folds, int | np.integer) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer of at least 2, got {num_folds!r}")


def _greedy_folds(patients: Sequence[Hashable], strata: Sequence[Hashable], num_folds: int, seed: int,
                  counts: dict[int, Counter] | None = None) -> list[int]:
    """Each patient (seeded order, larger first) joins the fold with the fewest cases of its majority
    stratum, then the fewest cases overall, then the lowest index. ``counts`` (fold -> stratum
    counter) starts the tallies from folds already filled."""
    cases: dict[Hashable, list[int]] = defaultdict(list)
    for index, patient in enumerate(patients):
        cases[patient].append(index)
    rank = {s: i for i, s in enumerate(_ordered(set(strata)))}
    tally = {f: Counter((counts or {}).get(f, {})) for f in range(num_folds)}
    folds = [0] * len(patients)
    for patient in _patient_order(cases, seed):
        majority = _majority([strata[i] for i in cases[patient]], rank)
        fold = min(range(num_folds), key=lambda f: (tally[f][majority], sum(tally[f].values()), f))
        for i in cases[patient]:
            folds[i] = fold
            tally[fold][strata[i]] += 1
    return folds


def assign_folds(patients: Sequence[Hashable], strata: Sequence[Hashable], num_folds: int,
                 seed: int) -> list[int]:
    """One fold index per case: patient-grouped, balanced in size and stratified by ``strata``.

    Patients (a ``seed``-ed permutation of the sorted ids, then stably the larger first) go one by one
    to the fold holding the fewest cases of the patient's majority stratum (ties to the stratum that
    sorts first), then the fewest cases overall, then the lowest index. With 0/1 labels as strata this
    is the assignment the sample-data generators have always written, so their manifests do not move.

    Args:
        patients: patient id of each case.
        strata: stratum of each case (``Target.stratum``: class index, or event indicator).
        num_folds: at least 2.
        seed: seeds the patient order; the same inputs always give the same folds.
    """
    _check_num_folds(num_folds)
    if len(patients) != len(strata):
        raise ValueError(f"{len(patients)} patient ids but {len(strata)} strata: give one of each per case")
    if not patients:
        raise ValueError("no cases to assign to folds: the datalist is empty")
    num_patients = len(set(patients))
    if num_patients < num_folds:
        logger.warning("%d patients for %d folds: %d folds will be empty; lower num_folds", num_patients,
                       num_folds, num_folds - num_patients)
    return _greedy_folds(patients, strata, int(num_folds), seed)


def _patient_of(record: Mapping, patient_key: str) -> Hashable:
    if patient_key not in record or record[patient_key] is None:
        name = record.get("case_id", "without case_id")
        raise ValueError(f"case {name} lacks the key '{patient_key}': folds are grouped by patient; add it "
                         f"or pass the key that holds the patient id as patient_key")
    return record[patient_key]


def assign_missing_folds(records: Sequence[Mapping], num_folds: int, target: Target, seed: int = 0,
                         patient_key: str = "patient_id") -> list[dict]:
    """Copies of ``records`` where each record without a ``fold`` (absent or ``None``) has gained one.

    Records that have a fold keep it. A patient some of whose cases already have a fold puts the rest
    there too; the other patients are assigned as by :func:`assign_folds`, counting the kept cases, so
    that new cases even out the folds. With no fold given anywhere this equals :func:`assign_folds`.

    Raises:
        ValueError: a fold outside ``0..num_folds-1``, or one patient's cases already in two folds.
    """
    _check_num_folds(num_folds)
    out = [dict(r) for r in records]
    patients = [_patient_of(r, patient_key) for r in out]
    strata = [target.stratum(r) for r in out]
    kept: dict[Hashable, int] = {}
    counts: dict[int, Counter] = defaultdict(Counter)
    for record, patient, stratum in zip(out, patients, strata, strict=True):
        fold = record.get(FOLD_KEY)
        if fold is None:
            continue
        name = record.get("case_id", "without case_id")
        if isinstance(fold, bool) or not isinstance(fold, int | np.integer) or not 0 <= fold < num_folds:
            raise ValueError(f"case {name}: fold {fold!r} is not an integer in 0..{num_folds - 1}; fix it or "
                             f"remove it to have it assigned")
        if kept.setdefault(patient, int(fold)) != fold:
            raise ValueError(f"case {name} is in fold {fold} but another case of its patient is in fold "
                             f"{kept[patient]}: a patient's cases must share one fold")
        counts[int(fold)][stratum] += 1
    missing = [i for i, r in enumerate(out) if r.get(FOLD_KEY) is None]
    fresh = [i for i in missing if patients[i] not in kept]
    for i in missing:
        if patients[i] in kept:
            out[i][FOLD_KEY] = kept[patients[i]]
    if fresh:
        folds = _greedy_folds([patients[i] for i in fresh], [strata[i] for i in fresh], int(num_folds), seed,
                              counts)
        for i, fold in zip(fresh, folds, strict=True):
            out[i][FOLD_KEY] = fold
    if len(set(patients)) < num_folds:
        logger.warning("%d patients for %d folds: some folds are empty; lower num_folds", len(set(patients)),
                       num_folds)
    return out


def inner_split(records: Sequence[Mapping], fraction: float = 0.2, *, target: Target, seed: int = 0,
                patient_key: str = "patient_id") -> tuple[list[dict], list[dict]]:
    """``(train, validation)``: a patient-grouped split of the training folds, stratified by ``target``.

    The validation part (about ``fraction`` of each stratum) selects the checkpoint, so that the outer
    fold stays unseen until it is reported. Patients (seeded order, larger first) join the side whose
    share of the patient's majority stratum is furthest below its quota, then the side furthest below
    its quota overall; ties go to training.

    Raises:
        ValueError: ``fraction`` outside (0, 1), or too few patients for both sides to have one.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction is the validation share and must lie in (0, 1), got {fraction!r}")
    rows = [dict(r) for r in records]
    patients = [_patient_of(r, patient_key) for r in rows]
    strata = [target.stratum(r) for r in rows]
    cases: dict[Hashable, list[int]] = defaultdict(list)
    for index, patient in enumerate(patients):
        cases[patient].append(index)
    if len(cases) < 2:
        raise ValueError(f"inner_split needs at least 2 patients in the training folds, got {len(cases)}")
    rank = {s: i for i, s in enumerate(_ordered(set(strata)))}
    totals = Counter(strata)
    shares = (1.0 - fraction, fraction)  # side 0 trains, side 1 validates
    tally = (Counter(), Counter())
    side_of: dict[Hashable, int] = {}
    for patient in _patient_order(cases, seed):
        majority = _majority([strata[i] for i in cases[patient]], rank)

        def deficit(side: int, majority: Hashable = majority) -> tuple[float, float, int]:
            return (tally[side][majority] - shares[side] * totals[majority],
                    sum(tally[side].values()) - shares[side] * len(rows), side)

        side = min((0, 1), key=deficit)
        side_of[patient] = side
        for i in cases[patient]:
            tally[side][strata[i]] += 1
    train = [r for r, p in zip(rows, patients, strict=True) if side_of[p] == 0]
    validation = [r for r, p in zip(rows, patients, strict=True) if side_of[p] == 1]
    if not train or not validation:
        raise ValueError(f"a validation fraction of {fraction} over {len(cases)} patients leaves one side empty; "
                         f"raise the fraction or add patients")
    return train, validation
