"""Data: the common on-disk layout, the built-in ``digits`` benchmark, public-dataset converters.

Core modules only (no Ray); the Ray Data reader is :mod:`dass_ray.data.ray_reader`.
"""
from dass_ray.data.layout import (
    IGNORE_INDEX,
    DataError,
    Split,
    image_path,
    label_path,
    list_ids,
    load_split,
    read_image,
    read_label,
    read_sample,
    split_dir,
)

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Split",
    "image_path",
    "label_path",
    "list_ids",
    "load_split",
    "read_image",
    "read_label",
    "read_sample",
    "split_dir",
]
