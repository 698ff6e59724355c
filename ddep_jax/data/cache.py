"""Decode a small dataset once and keep it in host memory.

Decoding dominates the input pipeline of the small datasets this project
trains on a CPU (a CamVid PNG or a CIFAR-10 JPEG is decoded again for every
crop), and it runs on the cores the train step needs. `cache_in_memory`
decodes this host's records once, in parallel, into read-only NumPy arrays;
the augmentations then read them (and copy what they change), so the
batches are exactly those of the uncached stream and the data-iterator
state stays the same.

Config (`config.data`, every stage): `cache` = 'auto' (cache when the
decoded records fit in `cache_max_mib`, estimated from the first record),
'memory' (always) or 'none'; `cache_max_mib` (MiB of decoded records per
host; default 2048: CIFAR-10 is ~150 MiB decoded, CamVid's 367 training
pairs at 960x720 ~1 GiB, ImageNet is never cached).
"""

from __future__ import annotations

import concurrent.futures
import sys
from typing import Any

import grain
import numpy as np
import tqdm
from absl import logging

CACHE_MODES = ("auto", "memory", "none")
MIB = 2**20


def record_bytes(record: dict[str, Any]) -> int:
    """Bytes of the NumPy values of one decoded record."""
    return int(sum(np.asarray(v).nbytes for v in record.values()))


def _frozen(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:  # a record the source leaves out (stays None)
        return None
    out = {}
    for k, v in record.items():
        v = np.array(v)  # a private copy: the cache must not alias a reader's buffer
        v.setflags(write=False)  # an augmentation writing in place fails loudly
        out[k] = v
    return out


def cache_in_memory(source, *, mode: str = "auto", max_mib: float = 2048,
                    num_threads: int = 2, name: str = "dataset"):
    """`source` with every record decoded once and held in memory.

    Args:
      source: random-access source (`__len__`, `__getitem__` -> dict of NumPy
        values), e.g. this host's shard as a `grain.MapDataset`.
      mode: 'auto' | 'memory' | 'none' (`CACHE_MODES`).
      max_mib: 'auto' caches only when len(source) x the first record's
        decoded size is at most this many MiB.
      num_threads: decoding threads.
      name: for the log lines.

    Returns:
      A `grain.MapDataset` over the decoded records (their arrays read-only),
      or `source` itself when not cached.

    Raises:
      ValueError: an unknown `mode`; errors of decoding a record (naming it,
        from the source) are raised as they are.
    """
    if mode not in CACHE_MODES:
        raise ValueError(f"data.cache={mode!r}: expected one of {CACHE_MODES}.")
    n = len(source)
    if mode == "none" or n == 0:
        return source
    first = source[0]
    sample = next((r for r in (source[i] for i in range(1, min(n, 8)))
                   if r is not None), None) if first is None else first
    estimate = record_bytes(sample) * n / MIB if sample is not None else float("inf")
    if mode == "auto" and estimate > max_mib:
        logging.info("%s: not cached in memory (~%.0f MiB decoded > data.cache_max_mib"
                     "=%g)", name, estimate, max_mib)
        return source
    records: list[Any] = [None] * n
    records[0] = _frozen(first)

    def decode(i):
        records[i] = _frozen(source[i])

    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        for _ in tqdm.tqdm(pool.map(decode, range(1, n)), total=n - 1,
                           desc=f"decoding {name} into memory", unit="record",
                           leave=False,
                           disable=n < 100 or not sys.stderr.isatty()):
            pass
    total = sum(record_bytes(r) for r in records if r is not None) / MIB
    logging.info("%s: %d records decoded into memory (%.0f MiB)", name, n, total)
    return grain.MapDataset.source(records)
