"""Optimizers with frozen parameter groups chosen by path rules.

Freezing follows big_vision: every parameter path ('encoder/Transformer/...')
is matched against ordered regex rules that give it a label; `optax.partition`
(formerly `multi_transform`) maps 'frozen' to `set_to_zero` (no optimizer
state, no update) and 'train' to Adam with cosine decay (DDeP Sec. 5.1). A
parameter that no rule covers is an error, never silently trained or frozen.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from ddep_jax.models import COLLECTIONS
from ddep_jax.common.tree_paths import path_str  # noqa: F401  (re-exported)

FROZEN, TRAIN = "frozen", "train"


def freeze_rules(frozen: Sequence[str],
                 lr_multipliers: Mapping[str, float] | None = None) -> list[tuple[str, str]]:
    """Rules that freeze the named top-level collections, give those of
    `lr_multipliers` their own 'train*<m>' group, and train the rest."""
    rules = [(f"^{name}/", FROZEN) for name in frozen]
    rules += [(f"^{name}/", f"{TRAIN}*{m:g}") for name, m in (lr_multipliers or {}).items()]
    return rules + [(f"^({'|'.join(COLLECTIONS)})/", TRAIN)]


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


def parse_lr_multipliers(text: str) -> dict[str, float]:
    """'encoder=0.01' -> {'encoder': 0.01}: top-level collections trained
    at a multiple of the schedule's learning rate ('' -> {}).

    Raises:
      ValueError: 'config.optimizer.lr_multipliers=...' naming a malformed
        item, an unknown collection or a multiplier <= 0.
    """
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, eq, value = item.partition("=")
        try:
            m = float(value) if eq else float("nan")
        except ValueError:
            m = float("nan")
        if name not in COLLECTIONS or not m > 0:
            raise ValueError(
                f"config.optimizer.lr_multipliers={text!r} is invalid: {item!r} must "
                f"be COLLECTION=MULTIPLIER with a collection of {COLLECTIONS} and a "
                "multiplier > 0, e.g. 'encoder=0.01'.")
        out[name] = m
    return out


def make_optimizer(params, frozen: Sequence[str], schedule, *, b1=0.9, b2=0.999,
                   weight_decay=0.0, grad_clip_norm=0.0,
                   lr_multipliers: Mapping[str, float] | None = None):
    """optax.partition over {'train': Adam(W) + cosine, 'frozen': set_to_zero}
    (and one 'train*<m>' group per multiplier of `lr_multipliers`, whose
    schedule is m times `schedule`).

    Args:
      params: the parameter tree (or its `jax.eval_shape`).
      frozen: top-level collections to freeze, e.g. ('encoder',).
      schedule: learning-rate schedule (step -> float).
      lr_multipliers: {collection: m}: e.g. {'encoder': 0.01}, the SSL4DP
        draft's encoder at 1/100 of the base rate. Gradient clipping (by the
        global norm) applies to each group on its own.

    Returns:
      (optax.GradientTransformation, labels tree).

    Raises:
      ValueError: a collection both frozen and given a multiplier.
    """
    multipliers = dict(lr_multipliers or {})
    both = sorted(set(multipliers) & set(frozen))
    if both:
        raise ValueError(f"config.optimizer.lr_multipliers names {both}, which are "
                         "frozen: drop them from one of the two.")
    labels = param_labels(params, freeze_rules(frozen, multipliers))

    def adam(lr):
        chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
        if weight_decay > 0:
            chain.append(optax.adamw(lr, b1, b2, weight_decay=weight_decay))
        else:
            chain.append(optax.adam(lr, b1, b2))
        return optax.chain(*chain)

    groups = {TRAIN: adam(schedule), FROZEN: optax.set_to_zero()}
    for m in multipliers.values():
        groups[f"{TRAIN}*{m:g}"] = adam(lambda step, m=m: m * schedule(step))
    return optax.partition(groups, labels), labels


def from_config(optimizer_config, params, frozen: Sequence[str], num_steps: int,
                peak_lr: float):
    """A stage's optimizer from its `config.optimizer` section.

    Args:
      optimizer_config: `config.optimizer` (warmup_steps, b1, b2,
        weight_decay, grad_clip_norm, lr_multipliers).
      params: the parameter tree (or its `jax.eval_shape`).
      frozen: top-level collections that get no updates.
      num_steps: the cosine schedule's length.
      peak_lr: the schedule's peak learning rate.

    Returns:
      (optax.GradientTransformation, schedule).
    """
    o = optimizer_config
    schedule = make_schedule(peak_lr, num_steps, o.warmup_steps)
    tx, _ = make_optimizer(params, frozen, schedule, b1=o.b1, b2=o.b2,
                           weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm,
                           lr_multipliers=parse_lr_multipliers(
                               o.get("lr_multipliers", "")))
    return tx, schedule


def split_microbatches(x: jax.Array, num: int) -> jax.Array:
    """[B, ...] -> [num, B / num, ...], micro-batch j holding examples j,
    j + num, j + 2 num, ... (strided, so that with B split over devices in
    contiguous blocks every micro-batch keeps the same split and needs no
    communication)."""
    b = x.shape[0]
    if b % num:
        raise ValueError(f"batch of {b} is not divisible into {num} micro-batches.")
    return x.reshape(b // num, num, *x.shape[1:]).swapaxes(0, 1)


def accumulate_gradients(loss_fn, params, batch, num_micro: int,
                         grad_shardings=None):
    """Value and gradient of a loss over `num_micro` micro-batches, summed.

    `loss_fn(params, micro_batch, index) -> (loss, aux)` must return the
    micro-batch's *share* of the full-batch loss (e.g. its mean divided by
    `num_micro`, or a sum divided by the full batch's count), so that the
    sums over micro-batches of loss, aux and gradient are the full-batch
    figures: gradient accumulation then equals one large batch up to float
    summation order. Only one micro-batch's activations are live at a time
    (`lax.scan`).

    Args:
      loss_fn: as above; `index` (int32 scalar) can fold dropout keys.
      params: what is differentiated.
      batch: pytree of arrays with a leading batch dimension B.
      num_micro: number of micro-batches (B divisible by it); 1 is one plain
        `value_and_grad` call.
      grad_shardings: NamedShardings of `params` (None: XLA chooses); the
        running gradient sum is kept in them, so that under FSDP it is
        sharded like the parameters instead of a full copy per device.

    Returns:
      ((loss, aux), grads), the sums over micro-batches.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        return grad_fn(params, batch, jnp.int32(0))
    micro = jax.tree.map(lambda x: split_microbatches(x, num_micro), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, first, jnp.int32(0)))

    def constrain(total):
        if grad_shardings is None:
            return total
        value, grads = total
        return value, jax.lax.with_sharding_constraint(grads, grad_shardings)

    def body(total, xs):
        index, mb = xs
        out = grad_fn(params, mb, index)
        return constrain(jax.tree.map(jnp.add, total, out)), None

    zeros = constrain(zeros)

    total, _ = jax.lax.scan(body, zeros,
                            (jnp.arange(num_micro, dtype=jnp.int32), micro))
    return total
