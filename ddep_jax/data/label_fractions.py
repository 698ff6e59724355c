"""Deterministic labelled subsets for label-efficient fine-tuning.

The paper fine-tunes on 1/5/10/20/100% of Pascal Context and ADE20K and on
1/30, 1/8, 1/4 and all of Cityscapes (DDeP Sec. 5.1, Table 6, Figs. 6-7),
with a new random labelled subset per run.

Subset rule (the same on every host, whatever the host count, because it
depends only on ``(num_examples, amount, seed)``):

* ``k = ceil(fraction * num_examples)`` for a fraction (so 1/30 of Cityscapes'
  2975 training images is 100, 1/8 is 372 and 1/4 is 744, the paper's
  counts), or ``k = count`` for an integer count;
* the subset is the first ``k`` entries of
  ``numpy.random.default_rng(seed).permutation(num_examples)``, returned
  sorted.

So for one seed the subsets are **nested**: 1% is inside 5%, inside 10%, ...,
inside 100% (every example). Different seeds give different subsets.
"""

from __future__ import annotations

import fractions
import math
from typing import Any, Sequence

import numpy as np

from ddep_jax.common import writers

NAMED_FRACTIONS = {
    "1%": 0.01, "5%": 0.05, "10%": 0.10, "20%": 0.20, "100%": 1.0,
    "1/30": 1 / 30, "1/8": 1 / 8, "1/4": 1 / 4,
}
"""The paper's label fractions by their usual names."""


def parse_amount(amount: str | float | int) -> tuple[str, float]:
    """Parses a label amount.

    Args:
      amount: ``'10%'``, ``'1/30'``, ``'0.25'``, ``0.25`` (fractions in (0, 1]),
        or an integer count ``'100'`` / ``100`` (>= 1, of examples).

    Returns:
      ``('fraction', f)`` with ``0 < f <= 1`` or ``('count', n)``.

    Raises:
      ValueError: unparsable, zero, negative or a fraction > 1; the message
        names the value and the accepted forms.
    """
    what = (f"label fraction {amount!r} is invalid: use a percentage ('10%'), a "
            "ratio ('1/30'), a fraction in (0, 1] ('0.25') or an example count "
            "('100').")
    if isinstance(amount, bool):
        raise ValueError(what)
    if isinstance(amount, int):
        if amount < 1:
            raise ValueError(what)
        return "count", float(amount)
    if isinstance(amount, float):
        if not 0 < amount <= 1:
            raise ValueError(what)
        return "fraction", float(amount)
    text = str(amount).strip()
    try:
        if text.endswith("%"):
            value = float(text[:-1]) / 100.0
        elif "/" in text:
            value = float(fractions.Fraction(text))
        elif text.isdigit():
            n = int(text)
            if n < 1:
                raise ValueError(what)
            return "count", float(n)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(what) from None
    if not 0 < value <= 1:
        raise ValueError(what)
    return "fraction", value


def num_labelled(num_examples: int, amount: str | float | int) -> int:
    """Number of labelled examples for `amount` of `num_examples`.

    Raises:
      ValueError: invalid amount, or a count larger than `num_examples`.
    """
    kind, value = parse_amount(amount)
    if kind == "count":
        n = int(value)
        if n > num_examples:
            raise ValueError(f"label fraction {amount!r} asks for {n} labelled "
                             f"examples but the split has {num_examples}.")
        return n
    # The epsilon keeps e.g. 0.1 * 2970 = 297.00000000000006 at 297.
    return max(1, min(num_examples, math.ceil(value * num_examples - 1e-9)))


def select_subset(num_examples: int, amount: str | float | int,
                  seed: int) -> np.ndarray:
    """Sorted indices of the labelled subset (see the module docstring).

    Returns:
      int64 [k] indices into the split, sorted ascending.
    """
    if num_examples < 1:
        raise ValueError(f"cannot select labelled examples from {num_examples}.")
    k = num_labelled(num_examples, amount)
    order = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(order[:k]).astype(np.int64)


def write_subset(path: str, *, dataset: str, split: str,
                 amount: str | float | int, seed: int, num_examples: int,
                 indices: Sequence[int], ids: Sequence[str] | None) -> dict:
    """Writes the chosen example ids as JSON (the workdir's record of them).

    Returns:
      The dict written: dataset, split, label_fraction, seed, num_examples,
      num_labelled, indices and (when known) ids (file names).
    """
    record: dict[str, Any] = {
        "dataset": dataset, "split": split, "label_fraction": str(amount),
        "seed": int(seed), "num_examples": int(num_examples),
        "num_labelled": len(indices), "indices": [int(i) for i in indices],
    }
    if ids is not None:
        record["ids"] = list(ids)
    writers.write_json(path, record)
    return record
