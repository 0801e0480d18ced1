"""Datasets (WDBC, MedMNIST, image folders, CSV manifests), partitioning, hospital splits."""

from fedcrypt.tasks.data.datasets import DATASETS, MEDMNIST_2D, load_dataset
from fedcrypt.tasks.data.folders import load_folder
from fedcrypt.tasks.data.hospital import (
    HOSPITAL_PARTITIONS,
    HospitalData,
    hospital_data,
    hospital_splits,
)
from fedcrypt.tasks.data.partition import PARTITIONS, label_keys, partition_indices
from fedcrypt.tasks.data.splits import Dataset, ImageSplit, Split

__all__ = [
    "DATASETS",
    "HOSPITAL_PARTITIONS",
    "MEDMNIST_2D",
    "PARTITIONS",
    "Dataset",
    "HospitalData",
    "ImageSplit",
    "Split",
    "hospital_data",
    "hospital_splits",
    "label_keys",
    "load_dataset",
    "load_folder",
    "partition_indices",
]
