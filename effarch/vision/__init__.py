"""Efficient mixers on images (survey section 8.1): scan orders over a grid of patches.

* :mod:`~effarch.vision.scans`: raster, snake and column orders, VMamba's cross-scan and
  cross-merge, Vision-RWKV's Q-Shift;
* :mod:`~effarch.vision.layers`: patch embedding, :class:`GridMixer` (attention, one scan,
  Vim's bidirectional scan, VMamba's four-way scan, Vision-RWKV) and a tiny
  :class:`VisionClassifier`.
"""

from .layers import SCANS, GridMixer, PatchEmbed, VisionClassifier, vision_classifier
from .scans import (
    SCAN_ORDERS,
    cross_merge,
    cross_scan,
    from_sequence,
    q_shift,
    scan_order,
    to_sequence,
)

__all__ = [
    "SCANS",
    "SCAN_ORDERS",
    "GridMixer",
    "PatchEmbed",
    "VisionClassifier",
    "cross_merge",
    "cross_scan",
    "from_sequence",
    "q_shift",
    "scan_order",
    "to_sequence",
    "vision_classifier",
]
