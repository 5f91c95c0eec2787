"""Datasets: vision and text loaders, augmentation (downloads go through :mod:`divekit.hub`)."""

from divekit.data.registry import (
    DatasetInfo,
    dataset_info,
    list_datasets,
    load_dataset,
    register_dataset,
)

# Importing a module registers its datasets.
from divekit.data import vision  # noqa: E402,F401  isort: skip
from divekit.data import text  # noqa: E402,F401  isort: skip
from divekit.data import detection  # noqa: E402,F401  isort: skip
from divekit.data import translation  # noqa: E402,F401  isort: skip
from divekit.data import segmentation  # noqa: E402,F401  isort: skip
from divekit.data import bert_pretrain  # noqa: E402,F401  isort: skip
from divekit.data import text_generated  # noqa: E402,F401  isort: skip

__all__ = ["DatasetInfo", "dataset_info", "list_datasets", "load_dataset", "register_dataset"]
