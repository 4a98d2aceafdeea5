"""Writers of the files the data tests read: CSV manifests and DICOM images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    fields = fields or list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def write_dicom(
    path: Path,
    arr: np.ndarray,
    photometric: str = "MONOCHROME2",
    modality: str = "CT",
    bits: int | None = None,
    **tags,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.Modality = modality
    ds.PatientID = "p1"
    ds.set_pixel_data(arr, photometric, bits or 8 * arr.dtype.itemsize)
    for key, value in tags.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    spacing: tuple[float, float] = (0.7, 0.8),
    thickness: float = 2.5,
    intercept: float = -1024.0,
    drop: tuple[str, ...] = (),
    prefix: str = "s",
) -> Path:
    """One CT series, a file per slice of ``volume`` (slices, rows, cols) int16, axial, in the
    LPS frame with the given pixel spacing (row, col) and slice spacing; ``drop`` leaves tags out."""
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k, plane in enumerate(np.asarray(volume)):
        tags = {
            "SeriesInstanceUID": series,
            "StudyInstanceUID": study,
            "FrameOfReferenceUID": frame,
            "ImagePositionPatient": [0.0, 0.0, thickness * k],
            "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
            "PixelSpacing": list(spacing),
            "SliceThickness": thickness,
            "InstanceNumber": k + 1,
            "RescaleSlope": 1,
            "RescaleIntercept": intercept,
        }
        for key in drop:
            tags.pop(key)
        write_dicom(folder / f"{prefix}{k:03d}.dcm", plane.astype(np.int16), **tags)
    return folder
