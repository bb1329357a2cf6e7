"""Command line: ``python -m oncofusion.cli predict|train``.

``predict`` runs a bundle's predictor on one image exactly as the MONAI Label server does (same
loading, same request validation), so a bad input reads the same here as over HTTP.
``train`` runs a bundle's training plan (``configs/plan.json``: stages, variants, folds), the same plan
``make`` and the server's ``/train`` run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from oncofusion.contract import InvalidRequest


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
    from oncofusion.io.cache import ImageCache
    from oncofusion.serving.infer_task import BundleInferTask

    request: dict[str, Any] = {"image": str(args.image), **dict(args.field or [])}
    if args.point:
        request["foreground"] = args.point
    if args.roi:
        request["roi"] = args.roi
    if args.mask:
        request["label"] = str(args.mask)
    if args.input:
        request["images"] = {name: str(path) for name, path in args.input}
    task = BundleInferTask(Path(args.bundle), ImageCache(max_bytes=0))
    label_file, result = task(request)
    if label_file and args.label_out:
        shutil.move(label_file, args.label_out)
        result["label_file"] = str(args.label_out)
    print(json.dumps(result, indent=2))
    return 0


def train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from oncofusion.training import TrainingPlan, run_plan

    bundle = Path(args.bundle).resolve()
    overrides: dict[str, Any] = {
        "datalist_file": str(Path(args.datalist_file).resolve()) if args.datalist_file else None,
        "max_epochs": args.max_epochs,
        "patience": args.patience,
        "ckpt_dir": str(Path(args.ckpt_dir).resolve()) if args.ckpt_dir else None,
        "output_dir": str(Path(args.output_dir).resolve()) if args.output_dir else None,
    }
    steps = TrainingPlan.load(bundle).steps(args.variant, args.fold)
    with tqdm(total=len(steps), desc=f"training {bundle.name}", unit="step") as bar:
        def advance(step, index, total):
            bar.set_postfix_str(step.describe())
            if index:
                bar.update(1)

        run_plan(bundle, overrides, args.variant, args.fold, progress=advance)
        bar.update(1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oncofusion", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", help="predict for one lesion in one image")
    p.add_argument("--bundle", required=True, help="bundle directory, e.g. bundles/lung_nodule_clip")
    p.add_argument("--image", required=True, type=Path,
                   help="the primary image: NIfTI/NRRD file or DICOM series folder (3D), DICOM/PNG/JPEG (2D)")
    p.add_argument("--input", type=_field, action="append",
                   help="a further image input name=path, e.g. slide=patient7.svs (repeatable)")
    p.add_argument("--point", type=_ints, action="append", help="lesion click i,j,k (voxel indices)")
    p.add_argument("--roi", type=_ints, help="box i0,i1,j0,j1,k0,k1 (voxel indices)")
    p.add_argument("--mask", type=Path, help="label mask on the image grid")
    p.add_argument("--field", type=_field, action="append", help="model field name=value (clinical, report)")
    p.add_argument("--label-out", type=Path, help="where to keep the label volume (NIfTI)")
    p.set_defaults(func=predict)

    t = commands.add_parser("train", help="run a bundle's training plan (configs/plan.json): every stage, "
                                          "variant and fold")
    t.add_argument("--bundle", required=True)
    t.add_argument("--datalist-file", help="manifest.json to train on (default: the bundle's)")
    t.add_argument("--variant", action="append", help="train only this variant (repeatable; default all)")
    t.add_argument("--fold", type=int, action="append", help="train only this fold (repeatable; default all)")
    t.add_argument("--max-epochs", type=int)
    t.add_argument("--patience", type=int, help="epochs without a better validation score before stopping")
    t.add_argument("--ckpt-dir", help="where fold checkpoints go (default: the bundle's models/)")
    t.add_argument("--output-dir", help="where logs and run outputs go (default: the bundle's runs/)")
    t.set_defaults(func=train)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InvalidRequest, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
