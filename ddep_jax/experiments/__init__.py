"""Experiments built on the training loop: the label-efficiency harness."""
