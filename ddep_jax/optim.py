"""Optimizers with frozen parameter groups chosen by path rules.

Freezing follows big_vision: every parameter path ('encoder/Transformer/...')
is matched against ordered regex rules that give it a label; `optax.partition`
(formerly `multi_transform`) maps 'frozen' to `set_to_zero` (no optimizer
state, no update) and 'train' to Adam with cosine decay (DDeP Sec. 5.1). A
parameter that no rule covers is an error, never silently trained or frozen.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import optax

FROZEN, TRAIN = "frozen", "train"


def path_str(path) -> str:
    """'encoder/Transformer/encoder_norm/scale' for a tree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def freeze_rules(frozen: Sequence[str]) -> list[tuple[str, str]]:
    """Rules that freeze the named top-level collections and train the rest."""
    rules = [(f"^{name}/", FROZEN) for name in frozen]
    return rules + [(r"^(encoder|decoder|head)/", TRAIN)]


def param_labels(params, rules: Sequence[tuple[str, str]]):
    """Labels every leaf by the first rule whose regex matches its path.

    Raises:
      ValueError: listing the parameter paths that no rule covers.
    """
    compiled = [(re.compile(rx), label) for rx, label in rules]
    missing = []

    def label(path, _):
        name = path_str(path)
        for rx, lab in compiled:
            if rx.search(name):
                return lab
        missing.append(name)
        return None

    labels = jax.tree_util.tree_map_with_path(label, params)
    if missing:
        raise ValueError(f"{len(missing)} parameters match no freeze/train rule "
                         f"{[r for r, _ in rules]}: {missing[:10]}")
    return labels


def make_schedule(peak_lr: float, total_steps: int, warmup_steps: int = 0):
    """Linear warm-up then cosine decay to 0 (DDeP Sec. 5.1: cosine)."""
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else peak_lr, peak_lr, warmup_steps,
        max(total_steps, warmup_steps + 1), end_value=0.0)


def make_optimizer(params, frozen: Sequence[str], schedule, *, b1=0.9, b2=0.999,
                   weight_decay=0.0, grad_clip_norm=0.0):
    """optax.partition over {'train': Adam(W) + cosine, 'frozen': set_to_zero}.

    Args:
      params: the parameter tree (or its `jax.eval_shape`).
      frozen: top-level collections to freeze, e.g. ('encoder',).
      schedule: learning-rate schedule (step -> float).

    Returns:
      (optax.GradientTransformation, labels tree).
    """
    labels = param_labels(params, freeze_rules(frozen))
    train = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
    if weight_decay > 0:
        train.append(optax.adamw(schedule, b1, b2, weight_decay=weight_decay))
    else:
        train.append(optax.adam(schedule, b1, b2))
    tx = optax.partition({TRAIN: optax.chain(*train), FROZEN: optax.set_to_zero()},
                         labels)
    return tx, labels
