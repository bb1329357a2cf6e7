"""Real ultrasound DICOM files from the ``pydicom-data`` package (anonymised scanner output, not thyroid
studies) for the demo datastore and the benchmarks: what a scanner really writes, next to the SYNTHETIC
thyroid set. They carry no report or demographics: the user types them into the model's form.

``python -m sample_data.real_ultrasound --out DIR`` links them into a datastore folder.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

#: datastore id -> shipped file: palette colour with region calibration, RGB without calibration, a
#: 120-frame YBR cine with calibration, a 16-bit palette frame
REAL_ULTRASOUND = {
    "us_real_palette": "OBXXXX1A.dcm",
    "us_real_rgb_uncalibrated": "US1_UNCR.dcm",
    "us_real_cine": "color3d_jpeg_baseline.dcm",
    "us_real_16bit": "gdcm-US-ALOKA-16.dcm",
}


def shipped_ultrasound(name: str) -> Path:
    """The path of ``name`` in the installed pydicom-data package (``data_store/data``)."""
    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pydicom-data is not installed (pip install -c constraints.txt pydicom-data)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not in the installed pydicom-data ({path.parent})")
    return path


def link_into(datastore: Path) -> list[Path]:
    """Symlink every file of :data:`REAL_ULTRASOUND` into ``datastore`` as ``<id>.dcm``."""
    datastore.mkdir(parents=True, exist_ok=True)
    links = []
    for study, name in REAL_ULTRASOUND.items():
        link = datastore / f"{study}.dcm"
        link.unlink(missing_ok=True)
        link.symlink_to(shipped_ultrasound(name))
        links.append(link)
    return links


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the datastore folder to link them into")
    for link in link_into(parser.parse_args().out):
        print(link)


if __name__ == "__main__":
    main()
