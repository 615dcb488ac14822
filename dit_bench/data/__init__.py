"""Data: built-in offline data sets (mnist, digits, shapes) and image folders."""

from dit_bench.data.datasets import (
    DATASETS,
    DataError,
    DataInfo,
    data_info,
    load_datasets,
    planned_data_info,
)

__all__ = ["DATASETS", "DataError", "DataInfo", "data_info", "load_datasets", "planned_data_info"]
