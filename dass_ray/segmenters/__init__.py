"""Segmentation models g: logits + pooled backbone features from diffusion-space images.

``build_segmenter(cfg, num_classes)`` picks the model by ``SegmenterConfig.arch``; the
heavy zoo (torchvision / transformers) is imported only when one of its models is built.
"""
from .base import (
    Segmenter,
    build_segmenter,
    load_pretrained_backbone,
    load_segmenter,
    read_segmenter_meta,
    read_state_dict,
    save_segmenter,
)
from .small_cnn import SmallCNN

__all__ = [
    "Segmenter",
    "SmallCNN",
    "build_segmenter",
    "load_pretrained_backbone",
    "load_segmenter",
    "read_segmenter_meta",
    "read_state_dict",
    "save_segmenter",
]
