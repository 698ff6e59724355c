"""Where a harness run's numbers come from: the code's commit, a hash of the
resolved config, and the machine's fingerprint (what a run's floating-point
result depends on besides code, config and seed), and the machine-keyed XLA
compilation cache of a grid."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import platform
import subprocess
from typing import Sequence

import jax

from ddep_jax.common import writers


def _cpu_info() -> tuple[str, str]:
    """(CPU model name, its instruction-set flags) from /proc/cpuinfo ('' where
    there is none)."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.strip()
    except OSError:
        pass
    return model or platform.processor(), flags


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), which XLA CPU sizes
    its thread pools and partitions its programs by."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1)


def machine_fingerprint() -> dict:
    """What a run's floating-point result depends on besides the code, the
    config and the seed (measured on camvid_cpu_long, No pretraining, 1/30,
    seed 0, 12 steps: two runs alike in all of these are bit-identical; one
    CPU against two, or AVX2 code against AVX-512, differ from the second
    step on):

    cpus: the CPUs the process may use (XLA CPU compiles and partitions the
      step by it, and Eigen splits its reductions by it);
    cpu_model, cpu_isa: the CPU and a hash of its instruction-set flags
      (XLA's code generation);
    xla_flags: $XLA_FLAGS; jax: the JAX version.
    """
    model, flags = _cpu_info()
    return {"cpus": usable_cpus(), "cpu_model": model,
            "cpu_isa": hashlib.sha256(flags.encode()).hexdigest()[:8],
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}


def use_compilation_cache(out: str) -> str:
    """Points XLA's persistent compilation cache at OUT/xla_cache/cpus<N>-<isa>
    unless one is set already (`JAX_COMPILATION_CACHE_DIR`,
    `jax_compilation_cache_dir`) or OUT is remote. A grid compiles the same
    fine-tuning init and step for every run of a recipe (only the data and
    the key differ); from the second run on both are cache hits (camvid_cpu:
    ~70 s of each run on one core: init ~40 s, step 32-38 s). The folder is
    per CPU count and instruction set because JAX's cache key holds neither,
    while XLA CPU compiles another program for another CPU count: a step
    compiled by a 2-CPU run and read back by a 1-CPU worker gave a third
    result, bit-different from both (`machine_fingerprint`). Returns the
    cache folder ('' = none)."""
    current = jax.config.jax_compilation_cache_dir
    if current or writers.is_remote(out):
        return current or ""
    m = machine_fingerprint()
    path = os.path.join(out, "xla_cache", f"cpus{m['cpus']}-{m['cpu_isa']}")
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def pin_cpus(cpus: Sequence[int]) -> None:
    """Restricts this process to `cpus` (before JAX's first computation sizes
    XLA's thread pools)."""
    os.sched_setaffinity(0, set(cpus))


def code_commit() -> str:
    """The git commit of the code this process runs ('<sha>', '<sha>-dirty'
    when tracked files differ from it, 'unknown' outside a git checkout or
    without git)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--"],
                               capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def config_hash(config, out: str) -> str:
    """sha256 (first 16 hex digits) of the resolved config as sorted JSON,
    with the paths inside OUT (`init.checkpoint`) made relative to OUT and
    `data.data_dir` left out, so that the same cell run in another OUT or on
    another machine hashes the same."""
    c = json.loads(config.to_json_best_effort(sort_keys=True))
    ckpt = c.get("init", {}).get("checkpoint")
    if ckpt and not writers.is_remote(ckpt) and not writers.is_remote(out):
        rel = os.path.relpath(ckpt, out)
        if not rel.startswith(".."):
            c["init"]["checkpoint"] = rel
    c.get("data", {}).pop("data_dir", None)
    text = json.dumps(c, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance(config, out: str) -> dict:
    """{'code_commit': `code_commit()`, 'config_hash': `config_hash`,
    'machine': `machine_fingerprint()`} of a run."""
    return {"code_commit": code_commit(), "config_hash": config_hash(config, out),
            "machine": machine_fingerprint()}
