"""Datasets: vision and text loaders, augmentation (downloads go through :mod:`divekit.hub`)."""

from divekit.data.registry import (
    DatasetInfo,
    dataset_info,
    list_datasets,
    load_dataset,
    register_dataset,
)

# Each module registers its datasets when imported; the registry imports every module of this
# package the first time a name is looked up or the datasets are listed (no list to keep).

__all__ = ["DatasetInfo", "dataset_info", "list_datasets", "load_dataset", "register_dataset"]
