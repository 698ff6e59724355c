"""Semantic-segmentation evaluation: metrics and the paper's test-time protocols.

`metrics`: confusion matrix (jit-able, shardable), host accumulation, mIoU and
friends. `inference`: whole-image, multi-scale + flip, sliding-window and
Cityscapes-halves prediction for any ``logits_fn`` (DDeP Sec. 5.1).
"""

from ddep_jax.evaluation.inference import (EVAL_MODES, PAPER_SCALES, crop_to,
                                           pad_to_multiple, predict,
                                           predict_cityscapes_halves,
                                           predict_multiscale, predict_sliding,
                                           predict_whole)
from ddep_jax.evaluation.metrics import (IGNORE_LABEL, accumulate, confusion_matrix,
                                         format_table, segmentation_metrics)

__all__ = [
    "EVAL_MODES", "PAPER_SCALES", "IGNORE_LABEL", "accumulate", "confusion_matrix",
    "crop_to", "format_table", "pad_to_multiple", "predict",
    "predict_cityscapes_halves", "predict_multiscale", "predict_sliding",
    "predict_whole", "segmentation_metrics",
]
