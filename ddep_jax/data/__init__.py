"""Data: TFDS builders (CamVid, ImageNet-21k), preparation CLI and readers."""
