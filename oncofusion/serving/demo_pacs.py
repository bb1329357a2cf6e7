"""``make demo-pacs``: the sample studies in an Orthanc PACS, served by MONAI Label over DICOMweb.

Starts Orthanc (DICOMweb plugin, loopback only, DICOM port off; ``apps/oncofusion/orthanc/orthanc.json``),
converts each sample NIfTI study to a CT series (one instance per slice, geometry from the NIfTI affine,
labelled SYNTHETIC), uploads them, and serves the app on ``--studies <orthanc>/dicom-web``: OHIF at
``/ohif/`` then reads the studies from the PACS, and predictions go back to it as SEG + SR. Offline
throughout. Needs ``apt-get install orthanc orthanc-dicomweb``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from oncofusion.serving.launcher import REPO_ROOT, LocalOrthanc, LocalServer

logger = logging.getLogger(__name__)

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_to_dicom_series(nifti: str | Path, out_dir: str | Path, patient_id: str) -> list[Path]:
    """One CT instance per slice along the volume's third axis, with the NIfTI's geometry in LPS.

    Columns run along the first voxel axis, rows along the second (``PixelSpacing`` = row spacing, column
    spacing), so the series read back by position gives the NIfTI's own grid and affine.
    """
    image = nib.load(str(nifti))
    volume = np.asarray(image.dataobj)
    lps = RAS_TO_LPS @ image.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos, col_cos = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    study, series = generate_uid(), generate_uid()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.PatientID = ds.PatientName = patient_id
        ds.StudyDescription = ds.SeriesDescription = "SYNTHETIC sample study (not patient data)"
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.FrameOfReferenceUID = study
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int16)).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        path = out_dir / f"{k:04d}.dcm"
        ds.save_as(path, write_like_original=False)
        files.append(path)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default=str(REPO_ROOT / "sample_data" / "demo"))
    parser.add_argument("--max-studies", type=int, default=10)
    parser.add_argument("--port", type=int, default=8000, help="MONAI Label's port (Orthanc takes a free one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="oncofusion_pacs_"))
    studies = sorted(Path(args.studies).glob("*.nii.gz"))[: args.max_studies]
    with LocalOrthanc(work / "orthanc") as pacs:
        for nifti in studies:
            name = nifti.name.removesuffix(".nii.gz")
            pacs.upload(nifti_to_dicom_series(nifti, work / "dicom" / name, patient_id=f"SYNTHETIC-{name}"))
            logger.info("uploaded %s", name)
        with LocalServer(pacs.dicomweb_url, work / "server", {"models": "all"}, port=args.port) as server:
            logger.info("PACS %s (DICOMweb %s); MONAI Label %s, OHIF %s/ohif/; Ctrl-C stops both",
                        pacs.url, pacs.dicomweb_url, server.url, server.url)
            stop = []
            signal.signal(signal.SIGINT, lambda *_: stop.append(True))
            signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
            while not stop and server.process.poll() is None:
                time.sleep(1)


if __name__ == "__main__":
    main()
