"""Label files on the primary image's grid, in the format the client asks for.

3D Slicer reads NIfTI or NRRD; OHIF v3's MONAI Label panel asks for ``result_extension: ".nrrd"`` and
parses the answer with nrrd-js, which throws "File is not an NRRD file!" on gzip NIfTI (no segment is
drawn). Both writers put the label on the image's voxel grid: axis 0 along the image's columns, 1 along
its rows, 2 along the slice normal (the order viewers use), with the image's geometry in the header.

A label is mostly zeros, and gzip at its fastest level shrinks it as well as at its best: a gzip NIfTI
goes through ISA-L at level 1 (about 0.05 s for a 512x512x300 box label, where nibabel's zlib took
0.5 s on the same loaded machine) and a gzip NRRD through zlib at level 1 (pynrrd's default is 9).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import torch
from isal import igzip

from oncofusion.contract import InvalidRequest

#: the answer formats, by the ``result_extension`` a client asks for
LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
#: DICOM/NRRD patient space (LPS) from NIfTI/MONAI world space (RAS): flip the first two axes
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: gzip level of the label files: labels are runs of zeros, which the fastest level packs as tightly
GZIP_LEVEL = 1


def affine_4x4(affine: np.ndarray) -> np.ndarray:
    """A 2D image's 3x3 affine embedded in a 4x4 (the third axis: 1 mm, through the origin)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape == (4, 4):
        return affine
    dims = affine.shape[0] - 1
    full = np.eye(4)
    full[:dims, :dims] = affine[:dims, :dims]
    full[:dims, 3] = affine[:dims, dims]
    return full


def label_array(label: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """The label as uint8 (int16 when it holds values beyond 0..255), checked against the image shape."""
    array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    while array.ndim > len(shape) and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != tuple(shape):
        raise RuntimeError(f"predictor returned a label of shape {array.shape}, expected the image shape {shape}")
    fits_uint8 = array.dtype in (np.uint8, np.bool_) or (array.min() >= 0 and array.max() <= 255)
    dtype = np.uint8 if fits_uint8 else np.int16
    # both formats store the first axis fastest: a Fortran-ordered array is written without a transpose,
    # which on a 512x512x300 label is most of the write time
    return np.asfortranarray(array.astype(dtype, copy=False))


def label_extension(request: dict[str, Any]) -> str:
    """The format the client asked for (``result_extension``; NIfTI gzip by default)."""
    extension = str(request.get("result_extension") or ".nii.gz").lower()
    if extension not in LABEL_EXTENSIONS:
        raise InvalidRequest(f"'result_extension' {extension!r} is not offered: use one of {list(LABEL_EXTENSIONS)}")
    return extension


def _temp_path(extension: str) -> str:
    fd, path = tempfile.mkstemp(suffix=extension, prefix="oncofusion_label_")
    os.close(fd)
    return path


def write_nifti_label(array: np.ndarray, affine: np.ndarray, extension: str = ".nii.gz") -> str:
    """A single-file NIfTI: nibabel's header, then the voxels straight from ``array``'s memory (nibabel's
    own writer copies them out in small pieces first, most of its time on a mostly-empty label)."""
    array = np.asfortranarray(array)
    image = nib.Nifti1Image(array, affine_4x4(affine))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image.update_header()
    header = image.header
    header.set_slope_inter(1.0, 0.0)  # stored as is, as nibabel writes an unscaled array
    header.set_data_offset(header.single_vox_offset + header.extensions.get_sizeondisk())
    path = _temp_path(extension)
    opener = (lambda p: igzip.open(p, "wb", compresslevel=GZIP_LEVEL)) if extension == ".nii.gz" else (
        lambda p: open(p, "wb"))
    with opener(path) as f:
        header.write_to(f)  # the header and its (empty) extension list
        f.write(bytes(int(header.get_data_offset()) - f.tell()))
        f.write(memoryview(array.T).cast("B"))  # the transpose of a Fortran array is C-contiguous: no copy
    return path


def write_nrrd_label(array: np.ndarray, affine: np.ndarray, compress: bool = False) -> str:
    """NRRD in LPS patient space (what DICOM viewers use): ``space directions`` are the columns of the
    image affine, ``space origin`` the first voxel's centre."""
    lps = RAS_TO_LPS @ affine_4x4(affine)
    dims = array.ndim
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :dims].T,
        "space origin": lps[:3, 3],
        "kinds": ["domain"] * dims,
        "encoding": "gzip" if compress else "raw",
    }
    path = _temp_path(".nrrd")
    nrrd.write(path, array, header, index_order="F", compression_level=GZIP_LEVEL)
    return path


def write_label(label: np.ndarray | torch.Tensor, affine: np.ndarray, shape: tuple[int, ...],
                extension: str = ".nii.gz", compress: bool = True) -> str:
    """Write a label on the image grid (2D or 3D) with the image's geometry; return the temp path."""
    array = label_array(label, shape)
    if extension == ".nrrd":
        return write_nrrd_label(array, affine, compress)
    return write_nifti_label(array, affine, extension)
