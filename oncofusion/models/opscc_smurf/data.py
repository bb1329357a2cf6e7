"""From a manifest record to a SMuRF training item, and from trained folds to out-of-fold predictions.

A record (:func:`oncofusion.data.manifest.datalist`) names a CT with its tumor and node masks, a slide
with its tumor outline, the grade and the disease-free survival. The bundle's configs compose:

- :class:`SlideGridd`: the slide -> ``wsi`` ``(n_fragments, 192, S, S)``, channel-first, read from the
  content-keyed cache the extract stage (:func:`extract_slide_grids`) filled (a miss embeds the slide,
  the same call, only slower);
- :func:`~oncofusion.models.opscc_smurf.subvolumes.subvolume_transforms`: the CT -> ``ct_tumor``,
  ``ct_nodes`` ``(4, X, Y, Z)`` in [0, 1];
- :class:`GradeSurvivalLabeld`: ``label`` ``(3,)`` = [grade, time, event], the layout
  :class:`~oncofusion.losses.multitask.MultitaskGradeSurvivalLoss` reads;
- :func:`grid_augmentation`: in training, each patient's grids turned by a random multiple of 90
  degrees, flipped, and a random share of their cells emptied (the signal of a slide is in what its
  regions show, not where they lie; 60-odd training patients memorise positions otherwise);
- :func:`record_transforms`: the above for the modalities a variant reads, as one flat ``Compose`` (so a
  ``CacheDataset`` caches everything up to the first random step);
- :class:`WsiStatisticsHandler` (:func:`fit_wsi_statistics`): when training starts, the training grids'
  channel statistics into the network, which standardises every grid with them (and saves them with
  its weights);
- :class:`FragmentCollate`: patients have different numbers of tissue fragments, so a batch pads ``wsi``
  to the batch's largest ``n`` with zero grids and says which are real in ``wsi_mask`` ``(B, n)``.

Training picks its checkpoint on the inner validation split by the validation loss, after a warm-up
(:class:`WarmupSelectionScore`, the authors' "best validation loss after epoch 10"). Evaluation runs
each case through the model of its own fold (:func:`predict_out_of_fold`) and cuts the out-of-fold
risks at their tertiles into the risk groups a served model reports (:func:`risk_group_cutoffs`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import list_data_collate
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlipd,
    RandomizableTransform,
    RandRotate90d,
    SelectItemsd,
)
from torch import nn

from oncofusion.data.slide_grids import DEFAULT_GRID_SIZE, slide_fragment_grids
from oncofusion.io.atomic import atomic_write_text
from oncofusion.models.opscc_smurf.network import (
    CT_MODALITIES,
    GRADE_LOGIT,
    LOG_HAZARD,
    MODALITIES,
    SmurfNet,
    grid_channel_statistics,
)
from oncofusion.networks.region_encoders import weights_digest
from oncofusion.targets import SurvivalTarget

logger = logging.getLogger(__name__)

#: the modalities each bundle variant reads (configs/<variant>.json sets ``variant``)
VARIANT_MODALITIES: dict[str, tuple[str, ...]] = {
    "fusion": MODALITIES,
    "radiology_only": CT_MODALITIES,
    "pathology_only": ("wsi",),
}
#: what the reports and the server call each variant
VARIANT_NAMES: dict[str, str] = {
    "fusion": "SMuRF (CT tumor + CT nodes + WSI)",
    "radiology_only": "radiology only (CT tumor + CT nodes)",
    "pathology_only": "pathology only (WSI)",
}
RISK_GROUP_NAMES = ("low", "intermediate", "high")


def variant_modalities(variant: str) -> tuple[str, ...]:
    """The modalities of a bundle variant; an unknown name lists the known ones."""
    if variant not in VARIANT_MODALITIES:
        raise ValueError(f"unknown variant {variant!r}; this bundle has {list(VARIANT_MODALITIES)}")
    return VARIANT_MODALITIES[variant]


def record_keys(modalities: Sequence[str]) -> dict[str, list[str]]:
    """The manifest keys a variant reads, as :func:`~oncofusion.data.manifest.datalist` arguments:
    ``keys`` (required), ``optional_keys`` and ``path_keys``. The CT (``image``) is always required by
    the manifest; a radiology-only model needs no slide, a pathology-only model no mask."""
    modalities = SmurfNet._check_modalities(modalities)
    keys, optional, paths = [], ["grade"], []
    if any(m in CT_MODALITIES for m in modalities):
        keys.append("tumor_mask")
        optional.append("node_mask")
        paths += ["tumor_mask", "node_mask"]
    if "wsi" in modalities:
        keys.append("slide")
        optional.append("slide_annotation")
        paths += ["slide", "slide_annotation"]
    return {"keys": keys, "optional_keys": optional, "path_keys": paths}


# -- the slide -----------------------------------------------------------------------------------------
class SlideGridd(MapTransform):
    """The slide under ``keys`` (a path) -> ``output_key``: ``(n_fragments, D, S, S)`` float32 tensor.

    :func:`~oncofusion.data.slide_grids.slide_fragment_grids` with ``encoder``, the tumor outline under
    ``annotation_key`` (a GeoJSON path; None keeps every fragment) and ``grid_options`` (``region_size``,
    ``target_mpp``, ``grid_size``, ``min_tissue``, ``min_tumor_overlap``, ``thumbnail_size``,
    ``batch_size``, ``num_workers``). The grids are cached in ``cache_dir`` by the slide's content, the
    outline, the encoder's weights and the planning options, so the extract stage embeds each slide once
    and training reads it back. The function's channel-last ``(n, S, S, D)`` becomes channel-first, as
    the network reads it.
    """

    def __init__(self, keys: KeysCollection, encoder: nn.Module, cache_dir: str | Path | None,
                 annotation_key: str | None = "slide_annotation", output_key: str = "wsi",
                 grid_options: Mapping[str, Any] | None = None):
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"one slide key, got {list(self.keys)}")
        self.encoder = encoder
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.annotation_key = annotation_key
        self.output_key = output_key
        self.grid_options = {"grid_size": DEFAULT_GRID_SIZE, **dict(grid_options or {}), "progress": False}

    def grids(self, slide: str | Path, annotation: str | Path | None) -> np.ndarray:
        """``(n, S, S, D)`` of one slide (cached)."""
        return slide_fragment_grids(slide, self.encoder, annotation=annotation, cache_dir=self.cache_dir,
                                    **self.grid_options)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            slide = d[key]
            if not slide:
                raise ValueError(f"case {d.get('case_id', '?')} has no slide under '{key}': add the slide's path "
                                 "to the manifest, or train the radiology_only variant")
            annotation = d.get(self.annotation_key) if self.annotation_key else None
            grids = self.grids(slide, annotation or None)
            d[self.output_key] = torch.from_numpy(np.ascontiguousarray(grids.transpose(0, 3, 1, 2)))
        return d


def extract_slide_grids(datalist: Sequence[Mapping[str, Any]], slide_transform: SlideGridd,
                        summary_file: str | Path | None = None) -> dict[str, Any]:
    """Embed every record's slide into ``slide_transform``'s cache (a hit costs a file ``stat``).

    Returns, and writes to ``summary_file`` when given, what was embedded: the number of slides, the
    fragments per slide, the grid and the encoder's weights digest (no case names: the cache holds
    none either).
    """
    if not datalist:
        raise ValueError("no records to extract: check the manifest and the folds the config selects")
    fragments, width = [], None
    for index, record in enumerate(datalist):
        slide = record.get(slide_transform.keys[0])
        if not slide:
            raise ValueError(f"record {index} ({record.get('case_id', '?')}) has no slide under "
                             f"'{slide_transform.keys[0]}'")
        annotation = record.get(slide_transform.annotation_key) if slide_transform.annotation_key else None
        grids = slide_transform.grids(slide, annotation or None)
        fragments.append(int(grids.shape[0]))
        width = int(grids.shape[-1])
        logger.info("slide %d/%d: %d fragment(s)", index + 1, len(datalist), grids.shape[0])
    summary = {"num_slides": len(fragments), "fragments_per_slide": {"min": min(fragments),
                                                                      "max": max(fragments),
                                                                      "mean": float(np.mean(fragments))},
               "grid_size": int(slide_transform.grid_options["grid_size"]), "embedding_dim": width,
               "encoder_digest": weights_digest(slide_transform.encoder),
               "grid_options": {k: v for k, v in slide_transform.grid_options.items() if k != "progress"}}
    if summary_file is not None:
        Path(summary_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(summary_file), json.dumps(summary, indent=2))
    return summary


def fit_wsi_statistics(network: SmurfNet, datalist: Sequence[Mapping[str, Any]], slide_transform: SlideGridd
                       ) -> SmurfNet:
    """Set ``network``'s slide-grid standardisation to the channel statistics of ``datalist``'s grids (the
    training split: the validation and test patients stay unseen). A network without a slide branch is
    returned unchanged."""
    if "wsi" not in network.modalities:
        return network
    grids = (slide_transform(record)[slide_transform.output_key] for record in datalist)
    mean, std = grid_channel_statistics(grids)
    network.set_wsi_statistics(mean, std)
    logger.info("slide grids standardised with the statistics of %d training slides", len(datalist))
    return network


class WsiStatisticsHandler:
    """Trainer handler: when training starts, :func:`fit_wsi_statistics` on the training split. At the
    start, not when the config builds the network, so that building a trainer reads no data."""

    def __init__(self, network: SmurfNet, datalist: Sequence[Mapping[str, Any]], slide_transform: SlideGridd):
        self.network = network
        self.datalist = datalist
        self.slide_transform = slide_transform

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        fit_wsi_statistics(self.network, self.datalist, self.slide_transform)


class RandGridCellDropoutd(RandomizableTransform, MapTransform):
    """Empty each cell of the grids under ``keys`` ``(n, D, S, S)`` with probability ``cell_prob`` (the same
    cells in every fragment), as a slide with fewer regions would look. Runs on every call (``prob`` 1)."""

    def __init__(self, keys: KeysCollection, cell_prob: float = 0.25, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if not 0.0 <= cell_prob < 1.0:
            raise ValueError(f"cell_prob must be in [0, 1), got {cell_prob}")
        self.cell_prob = float(cell_prob)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            grid = torch.as_tensor(d[key])
            if grid.ndim != 4:
                raise ValueError(f"'{key}' of shape {tuple(grid.shape)}; expected (n_fragments, D, S, S)")
            keep = self.R.random_sample(tuple(grid.shape[-2:])) >= self.cell_prob
            d[key] = grid * torch.as_tensor(keep, dtype=grid.dtype, device=grid.device)
        return d


def grid_augmentation(keys: KeysCollection = "wsi", cell_prob: float = 0.25) -> list[Callable]:
    """The training augmentation of slide grids ``(n, D, S, S)``: a random multiple of 90 degrees in the
    grid plane, a flip, and :class:`RandGridCellDropoutd`."""
    return [RandRotate90d(keys=keys, prob=1.0, max_k=3, spatial_axes=(1, 2)),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            RandGridCellDropoutd(keys=keys, cell_prob=cell_prob)]


# -- the label -----------------------------------------------------------------------------------------
class GradeSurvivalLabeld(MapTransform):
    """The record's grade (under ``keys``) and the target's time and event -> ``output_key``: float32
    ``(3,)`` = [grade, time, event]. A missing grade is NaN (the loss then trains survival only); a grade
    must be 0 or 1; time and event are validated by the :class:`~oncofusion.targets.SurvivalTarget`."""

    def __init__(self, keys: KeysCollection, target: SurvivalTarget, output_key: str = "label"):
        super().__init__(keys, allow_missing_keys=True)
        if len(self.keys) != 1:
            raise ValueError(f"one grade key, got {list(self.keys)}")
        if getattr(target, "kind", None) != "survival":
            raise ValueError(f"the label's time and event come from a survival target, got {type(target).__name__}")
        self.target = target
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        grade = d.get(key)
        if grade is None or (isinstance(grade, float) and math.isnan(grade)):
            grade = float("nan")
        elif isinstance(grade, bool) or grade not in (0, 1):
            raise ValueError(f"case {d.get('case_id', '?')}: '{key}' is {grade!r}; expected 0 (low grade), "
                             "1 (high grade) or null (unknown)")
        fields = self.target.parse(d)
        d[self.output_key] = torch.tensor(
            [float(grade), fields[self.target.time_key], fields[self.target.event_key]], dtype=torch.float32)
        return d


# -- composing -----------------------------------------------------------------------------------------
def record_transforms(modalities: Sequence[str], ct: Compose | Sequence[Callable] | None = None,
                      slide: Callable | None = None, label: Callable | None = None,
                      keep: Sequence[str] = (), slide_augmentation: Sequence[Callable] = ()) -> Compose:
    """One flat ``Compose`` from a record to the items a variant's network reads: ``label`` first, then
    ``slide`` (when ``wsi`` is read), then ``ct`` (when a CT region is read; e.g.
    ``subvolume_transforms(..., read=True)``), then ``slide_augmentation`` (when ``wsi`` is read; after
    the CT, whose reading is what the cache saves), then only the modalities, ``label`` and ``keep`` are
    kept.

    Nested ``Compose`` objects are flattened: a ``CacheDataset`` stops caching at the first random
    transform, and a nested ``Compose`` counts as one.
    """
    modalities = SmurfNet._check_modalities(modalities)
    steps: list[Callable] = []
    if label is not None:
        steps.append(label)
    if "wsi" in modalities:
        if slide is None:
            raise ValueError("the variant reads the slide ('wsi'): pass the slide transform (SlideGridd)")
        steps.append(slide)
    if any(m in CT_MODALITIES for m in modalities):
        if ct is None:
            raise ValueError("the variant reads the CT: pass the CT transforms (subvolume_transforms)")
        steps += list(ct.transforms if isinstance(ct, Compose) else ct)
    if "wsi" in modalities:
        steps += list(slide_augmentation)
    selected = [*modalities, *(["label"] if label is not None else []), *keep]
    steps.append(SelectItemsd(keys=selected))
    return Compose(steps).flatten()


class FragmentCollate:
    """``collate_fn`` for SMuRF batches: ``wsi`` ``(n_i, D, S, S)`` per patient padded with zero grids to
    ``(B, n_max, D, S, S)``, and ``mask_key`` ``(B, n_max)`` float (1 real fragment, 0 padding); every
    other key by MONAI's ``list_data_collate``. ``image_from`` copies that key to ``image`` after
    collation: MONAI's trainers pass a batch's ``image`` as the network's first input
    (:func:`~oncofusion.models.opscc_smurf.network.batch_keys` gives the rest).
    """

    def __init__(self, wsi_key: str = "wsi", mask_key: str = "wsi_mask", image_from: str | None = None):
        self.wsi_key = wsi_key
        self.mask_key = mask_key
        self.image_from = image_from

    def pad(self, grids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded ``(B, n_max, D, S, S)`` grids and their ``(B, n_max)`` mask."""
        grids = [torch.as_tensor(g) for g in grids]
        shapes = {tuple(g.shape[1:]) for g in grids}
        if any(g.ndim != 4 or g.shape[0] < 1 for g in grids) or len(shapes) != 1:
            raise ValueError(f"'{self.wsi_key}' must be (n_fragments >= 1, D, S, S) with one D, S for the batch, "
                             f"got {[tuple(g.shape) for g in grids]}: embed every slide with the same encoder "
                             "and grid_size")
        n_max = max(g.shape[0] for g in grids)
        padded = grids[0].new_zeros((len(grids), n_max, *grids[0].shape[1:]))
        mask = torch.zeros(len(grids), n_max, dtype=torch.float32)
        for i, g in enumerate(grids):
            padded[i, :g.shape[0]] = g
            mask[i, :g.shape[0]] = 1.0
        return padded, mask

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        items = [dict(item) for item in items]
        grids = [item.pop(self.wsi_key) for item in items] if items and self.wsi_key in items[0] else None
        batch = list_data_collate(items)
        if grids is not None:
            batch[self.wsi_key], batch[self.mask_key] = self.pad(grids)
        if self.image_from is not None:
            if self.image_from not in batch:
                raise KeyError(f"the batch has no '{self.image_from}' to use as the network's first input; "
                               f"it has {sorted(batch)}")
            batch["image"] = batch[self.image_from]
        return batch


# -- checkpoint selection ------------------------------------------------------------------------------
#: the selection score of a warm-up epoch: below any real score, rising with the epoch
WARMUP_SCORE_FLOOR = -1e12


class WarmupSelectionScore:
    """Turns the evaluator's loss metric into a score a ``CheckpointSaver`` keeps the best of (higher is
    better), ignoring the warm-up: epochs up to ``warmup_epochs`` score ``WARMUP_SCORE_FLOOR + epoch``
    (so, if training is no longer than the warm-up, the last epoch is kept), later epochs ``-loss``.

    Attach it to the evaluator before the ``CheckpointSaver`` (handlers run in the order attached); the
    evaluator's epoch is the trainer's (MONAI's ``ValidationHandler`` runs it with the trainer's epoch).
    """

    def __init__(self, metric_name: str = "val_loss", warmup_epochs: int = 10, output_name: str = "val_selection"):
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        self.metric_name = metric_name
        self.warmup_epochs = warmup_epochs
        self.output_name = output_name

    def score(self, epoch: int, loss: float) -> float:
        if epoch <= self.warmup_epochs:
            return WARMUP_SCORE_FLOOR + epoch
        return -float(loss) if math.isfinite(float(loss)) else WARMUP_SCORE_FLOOR

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        metrics = engine.state.metrics
        if self.metric_name not in metrics:
            raise KeyError(f"the evaluator computes no metric '{self.metric_name}' (it has {sorted(metrics)})")
        metrics[self.output_name] = self.score(int(engine.state.epoch), float(metrics[self.metric_name]))


def epoch_loss(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """``compute_fn`` of ignite's ``EpochMetric``: ``loss`` on the whole validation set at once (the Cox
    term's risk sets span every case, not one batch)."""

    def compute(prediction: torch.Tensor, target: torch.Tensor) -> float:
        with torch.no_grad():
            return float(loss(prediction.float(), target.float()))

    return compute


def stack_output(output: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """An evaluator's (decollated) output as ``(pred (B, 2), label (B, 3))`` for an ignite metric."""
    if isinstance(output, Mapping):
        return output["pred"], output["label"]
    return torch.stack([o["pred"] for o in output]), torch.stack([o["label"] for o in output])


# -- out-of-fold prediction ----------------------------------------------------------------------------
def predict_out_of_fold(ensemble: Any, datalist: Sequence[Mapping[str, Any]], preprocessing: Callable,
                        modalities: Sequence[str], target: SurvivalTarget, grade_key: str = "grade",
                        out_of_fold: bool = True, output_file: str | Path | None = None) -> list[dict[str, Any]]:
    """One prediction per record: the model of the record's own fold (``out_of_fold``) or the mean of
    every fold model, on ``preprocessing`` (the inference transforms: centred sub-volumes, no flips).

    Each prediction holds ``case_id``, ``fold``, the target's time and event, ``grade`` (None when
    unknown), ``log_hazard`` (the risk: higher = shorter disease-free survival), ``grade_logit`` and
    ``grade_probability`` (mean of the members' sigmoids). A patient is one batch of one: its fragments
    need no padding, and the head's BatchNorm runs in eval mode.
    """
    modalities = SmurfNet._check_modalities(modalities)
    predictions = []
    for record in datalist:
        item = preprocessing(dict(record))
        inputs = [torch.as_tensor(item[m])[None].to(ensemble.device) for m in modalities]
        fold = int(record["fold"]) if out_of_fold else None
        outputs = ensemble.member_outputs(*inputs, fold=fold)  # (M, 1, 2)
        log_hazard = float(outputs[:, 0, LOG_HAZARD].mean())
        grade_logit = float(outputs[:, 0, GRADE_LOGIT].mean())
        fields = target.parse(record)
        grade = record.get(grade_key)
        predictions.append({
            "case_id": record.get("case_id"), "fold": int(record["fold"]), **fields,
            "grade": None if grade is None else int(grade),
            "log_hazard": log_hazard, "grade_logit": grade_logit,
            "grade_probability": float(torch.sigmoid(outputs[:, 0, GRADE_LOGIT]).mean()),
        })
    if output_file is not None:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(output_file), json.dumps(predictions, indent=2))
    return predictions


def variant_dir(ckpt_dir: str | Path, variant: str) -> Path:
    """Where a variant's fold models live: ``models/fold*`` for the fusion model, ``models/<variant>/fold*``
    for the others."""
    return Path(ckpt_dir) if variant == "fusion" else Path(ckpt_dir) / variant


def predict_variants(variants: Sequence[str], network: SmurfNet, ckpt_dir: str | Path,
                     datalist: Sequence[Mapping[str, Any]], ct: Compose | None, slide: Callable | None,
                     target: SurvivalTarget, grade_key: str = "grade", device: str | torch.device = "cpu",
                     out_of_fold: bool = True, output_dir: str | Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """:func:`predict_out_of_fold` for each variant: its fold models (``network`` rebuilt with the variant's
    modalities) on its preprocessing; with ``output_dir``, each variant's predictions in
    ``predictions_<variant>.json``. A variant without checkpoints is an error naming it."""
    from oncofusion.ensemble import Ensemble, fold_checkpoints

    results = {}
    for variant in variants:
        modalities = variant_modalities(variant)
        folder = variant_dir(ckpt_dir, variant)
        checkpoints = fold_checkpoints(folder)
        if not checkpoints:
            raise FileNotFoundError(f"no checkpoint of the {variant} variant under {folder}: train it (configs/"
                                    f"plan.json) or leave it out of 'variants'")
        ensemble = Ensemble(checkpoints, network=network.variant(modalities=modalities), aggregation="mean",
                            device=device)
        preprocessing = record_transforms(modalities, ct=ct, slide=slide)
        output_file = None if output_dir is None else Path(output_dir) / f"predictions_{variant}.json"
        results[variant] = predict_out_of_fold(ensemble, datalist, preprocessing, modalities, target, grade_key,
                                               out_of_fold=out_of_fold, output_file=output_file)
    return results


def risk_group_cutoffs(predictions: Sequence[Mapping[str, Any]], risk_key: str = "log_hazard",
                       names: Sequence[str] = RISK_GROUP_NAMES) -> dict[str, Any]:
    """Cut-offs of the risk groups: the quantiles (tertiles for three names) of the out-of-fold risks.

    The fold models never saw the case they score, so these risks spread as a new patient's would;
    cut-offs from the ensemble's own (in-sample) risks would be too wide.
    """
    risks = np.array([float(p[risk_key]) for p in predictions if p.get(risk_key) is not None])
    if risks.size < len(names):
        raise ValueError(f"{risks.size} out-of-fold risks cannot be cut into {len(names)} groups")
    thresholds = np.quantile(risks, np.arange(1, len(names)) / len(names))
    return {"risk_key": risk_key, "names": list(names), "thresholds": thresholds.tolist(),
            "rule": "risk <= thresholds[0]: names[0]; ... ; risk > thresholds[-1]: names[-1]",
            "source": f"quantiles of {risks.size} out-of-fold risks"}


def risk_group(risk: float, cutoffs: Mapping[str, Any]) -> str:
    """The group name of one risk under :func:`risk_group_cutoffs` (a tie joins the lower group)."""
    index = int(np.searchsorted(np.asarray(cutoffs["thresholds"], float), float(risk), side="left"))
    return str(cutoffs["names"][index])


# -- evaluation ----------------------------------------------------------------------------------------
def grade_section(num_bootstrap: int = 1000, seed: int = 0, grade_key: str = "grade",
                  score_key: str = "grade_probability") -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
    """A report section (a function of the predictions): the grade AUROC with a bootstrap 95 % CI over the
    cases whose grade is known (None when they hold one grade only)."""
    from oncofusion.metrics.classification import auroc, bootstrap

    def section(predictions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        known = [p for p in predictions if p.get(grade_key) is not None]
        labels = np.array([int(p[grade_key]) for p in known])
        scores = np.array([float(p[score_key]) for p in known])
        two_classes = labels.size > 0 and 0 < labels.sum() < labels.size
        return {"score": score_key, "num_cases": int(labels.size), "num_high_grade": int(labels.sum()),
                "auroc": bootstrap(auroc, labels, scores, num_bootstrap, seed=seed).to_dict() if two_classes else None}

    return section


def _markdown(summary: Mapping[str, Any]) -> str:
    def estimate(value: Mapping[str, float] | None) -> str:
        return "n/a" if value is None else f"{value['value']:.3f} ({value['low']:.3f}-{value['high']:.3f})"

    lines = [f"# Evaluation: {summary['data']}", "", summary["note"], "",
             "| model | DFS C-index (95% CI) | grade AUROC (95% CI) | HR high vs low risk (95% CI) | log-rank p |",
             "|---|---|---|---|---|"]
    for name, m in summary["models"].items():
        high = m["hazard_ratios"]["groups"].get("high")
        hr = "n/a" if high is None else f"{high['hazard_ratio']:.2f} ({high['low']:.2f}-{high['high']:.2f})"
        p = "n/a" if m["logrank"] is None else f"{m['logrank']['p_value']:.3g}"
        lines.append(f"| {name} | {estimate(m['c_index'])} | {estimate(m['auroc'])} | {hr} | {p} |")
    lines += ["", "Risk groups: tertiles of the out-of-fold risks (see each model's report.json and "
              "km_risk_groups.png)."]
    return "\n".join(lines) + "\n"


def write_evaluation(predictions: Mapping[str, Sequence[Mapping[str, Any]]], output_dir: str | Path,
                     data_description: str, target: SurvivalTarget, num_bootstrap: int = 1000,
                     reference: Mapping[str, Any] | None = None, cutoff_dirs: Mapping[str, str | Path] | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """The survival report of each variant's predictions (``<output_dir>/<variant>/``: report.json with the
    grade AUROC as an extra section, km_risk_groups.png with the tertile groups, td_auc.png) and one
    comparison (``report.json``, ``report.md``: C-index and grade AUROC with bootstrap CIs, the high-risk
    group's hazard ratio and the log-rank p per model, the manifest's ``reference`` ceilings).

    ``cutoff_dirs`` (variant -> a model folder) gets each variant's ``risk_groups.json`` (the tertiles of
    its out-of-fold risks, :func:`risk_group_cutoffs`), the cut-offs the served model applies.
    """
    from oncofusion.evaluation.report import SYNTHETIC_NOTE
    from oncofusion.evaluation.survival import write_survival_report

    if not predictions:
        raise ValueError("no variant to evaluate: list at least one in 'variants'")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, Any] = {}
    for variant, rows in predictions.items():
        cutoffs = risk_group_cutoffs(rows)
        report = write_survival_report(
            rows, output_dir / variant, data_description, risk_key=cutoffs["risk_key"], num_bootstrap=num_bootstrap,
            seed=seed, target=target, num_groups=len(cutoffs["names"]), thresholds=cutoffs["thresholds"],
            thresholds_from=cutoffs["source"], extra={"grade": grade_section(num_bootstrap, seed)})
        if cutoff_dirs and variant in cutoff_dirs:
            path = Path(cutoff_dirs[variant]) / "risk_groups.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(cutoffs, indent=2))
            logger.info("risk-group cut-offs of %s written to %s", variant, path)
        groups = report["risk_groups"]
        models[VARIANT_NAMES.get(variant, variant)] = {
            "variant": variant, "c_index": report["c_index"], "auroc": report["grade"]["auroc"],
            "time_dependent_auc": report["time_dependent_auc"], "risk_groups": groups["groups"],
            "thresholds": groups["thresholds"], "hazard_ratios": groups["hazard_ratios"],
            "logrank": groups["logrank"], "report": f"{variant}/report.json",
        }
    first = next(iter(predictions.values()))
    summary = {"data": data_description, "note": SYNTHETIC_NOTE, "num_cases": len(first),
               "num_events": int(sum(int(p[target.event_key]) for p in first)),
               "score": {"survival": "log_hazard", "grade": "grade_probability"},
               "auroc_is": "the grade AUROC (high vs low grade)", "models": models,
               "reference": dict(reference or {})}
    atomic_write_text(output_dir / "report.json", json.dumps(summary, indent=2))
    atomic_write_text(output_dir / "report.md", _markdown(summary))
    return summary
