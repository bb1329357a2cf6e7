"""Whole-slide throughput: our region pipeline against plain OpenSlide reads of the same regions.

A SYNTHETIC pyramidal TIFF (8192 x 8192 at 0.5 um/px by default: three discs of real immunohistochemistry
texture from scikit-image on white glass, zlib tiles of 128 px) is planned once into fragment grids
(:func:`oncofusion.data.slide_grids.plan_fragment_grids`); every placed region is then read

- **raw**: serially, with ``openslide.OpenSlide.read_region`` (RGBA PIL image, nothing else);
- **pipeline read**: through :class:`~oncofusion.data.slide_grids.SlideRegionDataset` and the
  DataLoader, at full size and shrunk to the encoder input (what the pipeline really does), with
  ``num_workers`` 0 and 2;
- **pipeline read + encode**: :func:`~oncofusion.data.slide_grids.embed_plan` with the default CNN
  region encoder, ``num_workers`` 0 and 2.

Target: pipeline reading >= 0.5x the raw regions/s. Each timing is the best of ``--repeats`` passes after
one untimed pass that brings the file into the page cache (so no method pays the first disk read). The
CPUs may be shared: the load average is recorded with the results. Results go to ``bench/results/wsi.json``.

``python -m bench.wsi`` (about a minute on two cores; ``--size 4096`` for a quick run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results" / "wsi.json"

try:  # the shared slide builder; older trees keep it with the tests
    from sample_data.slides import write_pyramid
except ImportError:  # pragma: no cover
    from tests.slides import write_pyramid


def synthetic_slide(path: Path, size: int, mpp: float) -> tuple[Path, list[np.ndarray]]:
    """A SYNTHETIC ``size`` x ``size`` slide with three tissue discs, and a tumour outline (level-0 polygons)
    overlapping two of them."""
    import skimage.data as ski_data

    ihc = ski_data.immunohistochemistry()
    reps = -(-size // ihc.shape[0])
    texture = np.tile(ihc, (reps, reps, 1))[:size, :size]
    yy, xx = np.ogrid[:size, :size]
    tissue = np.zeros((size, size), bool)
    for cx, cy, r in ((0.3, 0.3, 0.22), (0.72, 0.35, 0.16), (0.5, 0.76, 0.2)):
        tissue |= (xx - cx * size) ** 2 + (yy - cy * size) ** 2 <= (r * size) ** 2
    base = np.where(tissue[..., None], texture, np.uint8(255))
    levels = max(1, int(np.log2(size / 512)) + 1)
    write_pyramid(path, base, levels=levels, mpp=mpp)
    tumor = [np.array([[0.2, 0.2], [0.45, 0.2], [0.45, 0.45], [0.2, 0.45]]) * size,
             np.array([[0.4, 0.7], [0.6, 0.7], [0.6, 0.85], [0.4, 0.85]]) * size]
    return path, tumor


def best_rate(run: Callable[[], int], repeats: int) -> tuple[float, int]:
    """(best seconds, items) over ``repeats`` timed runs of ``run`` (which returns the items it did)."""
    best, items = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        items = run()
        best = min(best, time.perf_counter() - start)
    return best, items


def bench_wsi(size: int = 8192, region_size: int = 1024, mpp: float = 0.5, grid_size: int = 16,
              batch_size: int = 8, repeats: int = 1, threads: int = 1, workdir: Path | None = None) -> dict[str, Any]:
    import openslide
    import torch

    from oncofusion.data.slide_grids import SlideRegionDataset, embed_plan, plan_fragment_grids, region_loader
    from oncofusion.io.slides import open_slide
    from oncofusion.networks.region_encoders import region_encoder

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        start = time.perf_counter()
        path, tumor = synthetic_slide(Path(tmp) / "synthetic_slide.tiff", size, mpp)
        build_s = time.perf_counter() - start

        start = time.perf_counter()
        with open_slide(path) as slide:
            plan = plan_fragment_grids(slide, region_size=region_size, target_mpp=mpp, grid_size=grid_size,
                                       annotation=tumor)
        plan_s = time.perf_counter() - start
        regions = [p.region for p in plan.placed]
        encoder = region_encoder("cnn")

        def raw() -> int:
            handle = openslide.OpenSlide(str(path))
            for r in regions:
                handle.read_region((r.x, r.y), r.level, (r.size, r.size))
            handle.close()
            return len(regions)

        def pipeline_read(workers: int, out_size: int | None) -> Callable[[], int]:
            def run() -> int:
                dataset = SlideRegionDataset(path, regions, out_size)
                count = sum(len(indices) for indices, _ in region_loader(dataset, batch_size, workers))
                dataset.close()
                return count
            return run

        def pipeline_encode(workers: int) -> Callable[[], int]:
            def run() -> int:
                embed_plan(path, plan, encoder, batch_size, workers, progress=False)
                return len(regions)
            return run

        raw()  # page cache warm-up, untimed
        load_before = os.getloadavg()
        cases: list[tuple[str, int | None, Callable[[], int]]] = [("raw OpenSlide.read_region", None, raw)]
        for workers in (0, 2):
            cases += [
                (f"pipeline read, full {region_size} px", workers, pipeline_read(workers, None)),
                (f"pipeline read + shrink to {encoder.input_size} px", workers,
                 pipeline_read(workers, encoder.input_size)),
                ("pipeline read + shrink + encode (cnn)", workers, pipeline_encode(workers)),
            ]
        rows = []
        for name, workers, run in cases:
            seconds, count = best_rate(run, repeats)
            rows.append({"method": name, "num_workers": workers, "regions": count, "seconds": round(seconds, 3),
                         "regions_per_s": round(count / seconds, 2)})
        raw_rate = rows[0]["regions_per_s"]
        for row in rows:
            row["ratio_to_raw"] = round(row["regions_per_s"] / raw_rate, 3)

    return {
        "data": "SYNTHETIC pyramidal TIFF (real IHC texture tiled into three discs), zlib tiles 128 px",
        "slide_px": size, "mpp": mpp, "region_px": region_size, "grid_size": grid_size, "batch_size": batch_size,
        "regions": len(regions), "fragments": plan.n_fragments, "fragment_shapes": [list(s) for s in plan.fragment_shapes],
        "build_slide_s": round(build_s, 2), "plan_s": round(plan_s, 3), "repeats": repeats,
        "torch_threads": threads, "cpu_count": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(), "torch": torch.__version__, "openslide": openslide.__library_version__,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"{'method':<44} {'workers':>7} {'regions':>7} {'s':>7} {'regions/s':>10} {'x raw':>7}"]
    for row in result["rows"]:
        workers = "-" if row["num_workers"] is None else str(row["num_workers"])
        lines.append(f"{row['method']:<44} {workers:>7} {row['regions']:>7} {row['seconds']:>7.2f} "
                     f"{row['regions_per_s']:>10.2f} {row['ratio_to_raw']:>7.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="slide side in level-0 pixels")
    parser.add_argument("--region-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the encoding process")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = bench_wsi(size=args.size, region_size=args.region_size, batch_size=args.batch_size,
                       repeats=args.repeats, threads=args.threads)
    print(f"SYNTHETIC {result['slide_px']} px slide: {result['regions']} regions of {result['region_px']} px in "
          f"{result['fragments']} fragments (built in {result['build_slide_s']} s, planned in {result['plan_s']} s); "
          f"load average {result['load_average_before'][0]} on {result['cpu_count']} CPUs")
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
