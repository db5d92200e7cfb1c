"""Raw MedMNIST input: locating, fetching, checking and reading one release file."""

from .medmnist_source import (
    SPLITS,
    DatasetSpec,
    MedMNISTSourceError,
    RawDataChecksumError,
    RawDataFormatError,
    RawDataMissingError,
    UnsupportedDatasetError,
    dataset_spec,
    ensure_raw_file,
    file_md5,
    load_arrays,
    pixel_sha1,
    raw_file_path,
    verify_md5,
)

__all__ = [
    "SPLITS",
    "DatasetSpec",
    "MedMNISTSourceError",
    "RawDataChecksumError",
    "RawDataFormatError",
    "RawDataMissingError",
    "UnsupportedDatasetError",
    "dataset_spec",
    "ensure_raw_file",
    "file_md5",
    "load_arrays",
    "pixel_sha1",
    "raw_file_path",
    "verify_md5",
]
