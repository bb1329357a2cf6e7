"""Command line: ``python -m oncofusion.cli predict|train``.

``predict`` runs a bundle's predictor on one image exactly as the MONAI Label server does (same
loading, same request validation), so a bad input reads the same here as over HTTP.
``train`` runs a bundle's ``train.json`` once per fold, the K-fold recipe of the papers.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from oncofusion.serving.predictor import InvalidRequest


def _ints(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _field(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def predict(args: argparse.Namespace) -> int:
    from oncofusion.serving.image_cache import ImageCache
    from oncofusion.serving.infer_task import BundleInferTask

    request: dict[str, Any] = {"image": str(args.image), **dict(args.field or [])}
    if args.point:
        request["foreground"] = args.point
    if args.roi:
        request["roi"] = args.roi
    if args.mask:
        request["label"] = str(args.mask)
    task = BundleInferTask(Path(args.bundle), ImageCache(capacity=1))
    label_file, result = task(request)
    if label_file and args.label_out:
        shutil.move(label_file, args.label_out)
        result["label_file"] = str(args.label_out)
    print(json.dumps(result, indent=2))
    return 0


def train(args: argparse.Namespace) -> int:
    from monai.bundle import run
    from tqdm import tqdm

    bundle = Path(args.bundle).resolve()
    overrides: dict[str, Any] = {"bundle_root": str(bundle)}
    if args.datalist_file:
        overrides["datalist_file"] = str(Path(args.datalist_file).resolve())
    if args.max_epochs:
        overrides["max_epochs"] = args.max_epochs
    if args.ckpt_dir:
        overrides["ckpt_dir"] = str(Path(args.ckpt_dir).resolve())
    for fold in tqdm(range(args.folds), desc=f"training {bundle.name}", unit="fold"):
        run(config_file=str(bundle / "configs" / "train.json"), logging_file=str(bundle / "configs" / "logging.conf"),
            fold=fold, **overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oncofusion", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", help="predict for one lesion in one image")
    p.add_argument("--bundle", required=True, help="bundle directory, e.g. bundles/lung_nodule_clip")
    p.add_argument("--image", required=True, type=Path, help="NIfTI file or DICOM series folder")
    p.add_argument("--point", type=_ints, action="append", help="lesion click i,j,k (voxel indices)")
    p.add_argument("--roi", type=_ints, help="box i0,i1,j0,j1,k0,k1 (voxel indices)")
    p.add_argument("--mask", type=Path, help="label mask on the image grid")
    p.add_argument("--field", type=_field, action="append", help="model field name=value (clinical, report)")
    p.add_argument("--label-out", type=Path, help="where to keep the label volume (NIfTI)")
    p.set_defaults(func=predict)

    t = commands.add_parser("train", help="train a bundle fold by fold")
    t.add_argument("--bundle", required=True)
    t.add_argument("--datalist-file", help="manifest.json to train on (default: the bundle's)")
    t.add_argument("--folds", type=int, default=5)
    t.add_argument("--max-epochs", type=int)
    t.add_argument("--ckpt-dir", help="where fold checkpoints go (default: the bundle's models/)")
    t.set_defaults(func=train)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InvalidRequest, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
