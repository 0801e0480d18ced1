"""Datasets (WDBC, MedMNIST), partitioning across hospitals, and per-hospital loaders."""

from fedcrypt.tasks.data.datasets import DATASETS, Dataset, Split, load_dataset
from fedcrypt.tasks.data.hospital import HospitalData, hospital_data
from fedcrypt.tasks.data.partition import PARTITIONS, partition_indices

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "Dataset",
    "HospitalData",
    "Split",
    "hospital_data",
    "load_dataset",
    "partition_indices",
]
