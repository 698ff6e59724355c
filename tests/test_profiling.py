"""`profiling.op_breakdown`: XLA op time by kind from a real jax.profiler trace."""

import re

import jax
import jax.numpy as jnp
import pytest

from ddep_jax.training import profiling


def test_op_breakdown_names_the_compiled_programs_ops(tmp_path):
    """A traced jitted function: every kind reported is an instruction of its
    optimised HLO (name without the .N suffix), none is a runtime span, and
    the figures are per traced step."""
    f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum(axis=0))
    a = jnp.ones((256, 256))
    compiled = f.lower(a, a).compile()
    jax.block_until_ready(compiled(a, a))
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(2):
            jax.block_until_ready(compiled(a, a))
    rows = profiling.op_breakdown(str(tmp_path), num_steps=2)
    assert rows, "no op events in the trace"
    names = set(re.findall(r"%([\w.-]+) = ", compiled.as_text()))
    kinds = {re.sub(r"\.\d+$", "", n) for n in names}
    for row in rows:
        assert row["kind"] in kinds, (row, sorted(kinds))
        assert row["ms_per_step"] >= 0 and row["ops_per_step"] > 0
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert [r["ms_per_step"] for r in rows] == sorted(
        (r["ms_per_step"] for r in rows), reverse=True)


def test_op_breakdown_without_a_trace_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace=True"):
        profiling.op_breakdown(str(tmp_path), 1)


def test_op_breakdown_counts_a_loops_body_once(tmp_path):
    """A `while` event spans its body's ops: each op counts its self time,
    so the loop's share is its own overhead, not its body's time again."""
    def body(i, x):
        return jnp.tanh(x @ x)

    f = jax.jit(lambda x: jax.lax.fori_loop(0, 20, body, x))
    a = jnp.eye(256) * 0.5
    jax.block_until_ready(f(a))
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        jax.block_until_ready(f(a))
    rows = {r["kind"]: r for r in profiling.op_breakdown(str(tmp_path), num_steps=1)}
    assert "while" in rows
    body_ms = sum(r["ms_per_step"] for k, r in rows.items() if k != "while")
    assert rows["while"]["ms_per_step"] < 0.5 * body_ms, rows
    assert all(r["ms_per_step"] >= 0 for r in rows.values())
