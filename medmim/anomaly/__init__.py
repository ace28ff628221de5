"""Reconstruction-based anomaly detection with masked autoencoders (``medmim anomaly train|score``).

Train MAE / SparK (optionally with a memory of normal patterns) on normal images only; score an
image by reconstructing it under K masks whose union covers every patch and averaging the per-pixel
error (L2, L1, 1 - SSIM) over the masks that hid each pixel. See docs/anomaly.md.

Modules: ``scoring`` (masks, error maps, scores), ``memory`` and ``model`` (memory-augmented MAE),
``metrics``, ``outputs`` (CSV, PNG overlays, NIfTI maps), ``pipeline`` (train / score), ``cli``.
"""

from medmim.anomaly.metrics import best_dice, image_metrics, pixel_metrics, threshold_at_specificity
from medmim.anomaly.scoring import ScoreSettings, anomaly_maps, covering_masks, image_scores, score_items

__all__ = ["ScoreSettings", "anomaly_maps", "best_dice", "covering_masks", "image_metrics", "image_scores",
           "pixel_metrics", "score_items", "threshold_at_specificity"]
