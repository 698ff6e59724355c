"""The label-efficiency harness's records: results.jsonl and
pretraining.jsonl (read, merged with what other invocations sharing OUT
wrote, written), summary.md and the plots (`write_outputs`), the training
loss curve a record carries (`loss_curve`), and the `--list` text. A mixin
of `label_efficiency.Harness`."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
from etils import epath

from ddep_jax.common import writers
from ddep_jax.experiments.recipe import FinetuneRun

RESULT_KEYS = ("recipe", "row", "row_name", "fraction", "labelled_images", "seed",
               "miou", "per_class_iou", "pixel_accuracy", "split", "steps",
               "cpu_seconds", "cpu_seconds_complete", "wall_seconds", "workdir",
               "init_checkpoint", "train_loss", "code_commit", "config_hash",
               "machine")
"""The fields of a results.jsonl line: mIoU and pixel accuracy in [0, 1] as
the evaluation reports them, per-class IoU as {class name: IoU or null},
CPU seconds (user + system, all threads) of the invocations that ran it
(`cpu_seconds_complete` false when one of them was killed before it could
count), the workdir relative to OUT, and the training loss curve
(`loss_curve`: [[last step of a window, mean loss], ...]), and its
provenance (`provenance`): the code's git commit, a hash of the resolved
config and the machine's fingerprint (CPU count, CPU and instruction set, XLA
flags: `machine_fingerprint`); pretraining.jsonl lines carry the same."""

CURVE_POINTS = 20
"""Windows a run's training loss is averaged over in its results line."""

COST_FILE = "harness_cost.json"
WORKER_RECORD = "harness_record.json"
"""A `--jobs` worker's record of its run, in the run's workdir, which the
parent harness moves into results.jsonl / pretraining.jsonl."""


def _is_main() -> bool:
    return jax.process_index() == 0


def _config_name(config, arg: str) -> str:
    name = getattr(config, "__qualname__", None) if callable(config) else config
    return f"{name}{':' + arg if arg else ''}"


def _list_text(harness) -> str:
    """`--list`: each run's status and CPU minutes (recorded, or '~' estimated
    from the recorded runs: `Harness.costs`), then what is left to run."""
    costs = harness.costs()
    lines, cpu_left, wall_left, left, unknown = [], 0.0, 0.0, 0, 0
    for run_id, status in harness.plan():
        cost = costs[run_id]
        text = "" if cost is None else f"{'~' * cost[2] + f'{cost[0] / 60:.1f}':>7s} CPU min"
        lines.append(f"{status:8s} {run_id:36s} {text}".rstrip())
        if status not in ("done", "external"):
            left += 1
            if cost is None:
                unknown += 1
            else:
                cpu_left, wall_left = cpu_left + cost[0], wall_left + cost[1]
    tail = f"left: {left} run(s)"
    if left > unknown:
        tail += (f", ~{cpu_left / 3600:.2f} CPU h; ~{wall_left / 3600 / harness.jobs:.2f} h "
                 f"wall at --jobs={harness.jobs} (from the recorded runs' wall time, "
                 "at the --jobs they ran with)")
    if unknown:
        tail += f"; {unknown} with nothing recorded to estimate from"
    return "\n".join(lines + [tail]) + "\n"


def loss_curve(workdir: str, points: int = CURVE_POINTS) -> list[list[float]] | None:
    """A run's training loss (WORKDIR/loss_history.json, one [step, loss] per
    step, `loop.run`) as means over at most `points` windows of a fixed step
    grid: window k holds steps ((k - 1) * size, k * size], size =
    ceil(last step / points), and is reported at its end (the last window at
    the last step), so runs of the same length share their steps even where a
    history lacks some. Returns [[step, mean loss], ...]; None where the
    workdir has no history."""
    history = writers.read_json(os.path.join(workdir, "loss_history.json"))
    if not history:
        return None
    last = max(int(step) for step, _ in history)
    size = max(1, -(-last // points))
    windows: dict[int, list[float]] = {}
    for step, loss in history:
        end = min(-(-int(step) // size) * size, last)
        windows.setdefault(end, []).append(float(loss))
    return [[end, round(sum(v) / len(v), 5)] for end, v in sorted(windows.items())]


def _final_figures(workdir: str, done: Mapping) -> dict:
    """The scalar figures of a pretraining run's end: its final evaluation
    (stage 1: accuracy) and the last logged metrics (stage 2: loss, grid PSNR)."""
    figures: dict[str, Any] = {}
    for split, report in (done.get("eval") or {}).items():
        for k, v in report.items():
            if isinstance(v, (int, float)) and k in ("accuracy", "top1", "miou", "loss"):
                figures[f"{split}/{k}"] = v
    path = epath.Path(workdir, "metrics.jsonl")
    if path.exists():
        last: dict[str, Any] = {}
        for line in path.read_text().splitlines():
            try:
                last.update(json.loads(line))
            except json.JSONDecodeError:
                continue
        for k in ("loss", "denoise/psnr_noisy", "denoise/psnr_denoised"):
            if isinstance(last.get(k), (int, float)) and math.isfinite(last[k]):
                figures[k] = round(last[k], 4)
    return figures


class HarnessRecords:
    """The records half of `label_efficiency.Harness` (its attributes:
    recipe, out, results, pretraining_records, failures, worker)."""

    @staticmethod
    def _result_key(record: Mapping) -> tuple:
        return record["row"], record["fraction"], record["seed"]

    def _read_jsonl(self, name: str) -> list[dict]:
        path = epath.Path(self.out, name)
        text = path.read_text() if path.exists() else ""
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {number} is not JSON ({e}); fix or "
                                     "delete that line (the run is then read back "
                                     "from its workdir).") from None
        return records

    def _add_result(self, record: dict) -> None:
        self.results = self._merged("results.jsonl", self.results, record,
                                    self._result_key)
        self._write_jsonl("results.jsonl", self.results)

    def _add_pretraining_record(self, record: dict) -> None:
        self.pretraining_records = self._merged(
            "pretraining.jsonl", self.pretraining_records, record, lambda r: r["name"])
        self._write_jsonl("pretraining.jsonl", self.pretraining_records)

    def _merged(self, name: str, mine: Sequence[dict], record: dict,
                key: Callable[[Mapping], Any]) -> list[dict]:
        """OUT/name as it is now (what other invocations sharing OUT wrote
        since this one read it), this invocation's records it lacks, and
        `record` in place of its key's line: invocations with different
        --only add to the same files without dropping each other's runs."""
        merged = {key(r): r for r in self._read_jsonl(name)}
        for r in mine:
            merged.setdefault(key(r), r)
        merged.pop(key(record), None)
        return [*merged.values(), record]

    def _sync_records(self) -> None:
        """Takes in the records other invocations sharing OUT wrote, and
        writes back any of this invocation's that a concurrent write dropped
        (both read, both wrote: the second write lacks the first's run)."""
        for name, attr, key in (("results.jsonl", "results", self._result_key),
                                ("pretraining.jsonl", "pretraining_records",
                                 lambda r: r["name"])):
            merged = {key(r): r for r in self._read_jsonl(name)}
            missing = [r for r in getattr(self, attr) if key(r) not in merged]
            merged.update((key(r), r) for r in missing)
            setattr(self, attr, list(merged.values()))
            if missing:
                self._write_jsonl(name, getattr(self, attr))

    def _write_jsonl(self, name: str, records: Sequence[Mapping]) -> None:
        if _is_main():
            # Keys in the records' own order (per-class IoU in class order).
            text = "".join(json.dumps(r) + "\n" for r in records)
            writers.write_bytes(os.path.join(self.out, name), text.encode())

    def write_outputs(self) -> None:
        """summary.md and the figure(s) from the results so far."""
        if not _is_main() or self.worker:
            return
        from ddep_jax.experiments import figures, report

        self._sync_records()
        total = len(self.finetune_runs())
        text = report.summary_markdown(self.recipe, self.results,
                                       self.pretraining_records, total_runs=total,
                                       failures=self.failures, commands=self.commands())
        writers.write_bytes(os.path.join(self.out, "summary.md"), text.encode())
        for group, suffix in (("main", ""), ("ablation", "_ablations")):
            rows = [r for r in self.recipe.rows if r.group == group]
            if rows and any(r["row"] in {x.key for x in rows} for r in self.results):
                figures.plot(self.recipe, self.results, rows,
                             os.path.join(self.out, f"label_efficiency{suffix}.png"),
                             self.pretraining_records)
                if any(r.get("train_loss") for r in self.results):
                    figures.plot_curves(self.recipe, self.results, rows, os.path.join(
                        self.out, f"training_loss{suffix}.png"))

    def commands(self) -> dict:
        """{'pretraining': {name: command}, 'finetune': {(row, fraction):
        command of seed 0}} of every cell of the recipe (`report._reproduce`)."""
        pre = {p.name: self.pretraining_command(p.name) for p in self.recipe.pretrainings
               if p.config}
        ft = {}
        for row in self.recipe.rows:
            for f in self.recipe.fractions:
                if not self.recipe.seeds_of(row, f):
                    continue  # the row is not run at this fraction
                try:
                    ft[(row.key, f)] = self.finetune_command(FinetuneRun(row.key, f, 0))
                except ValueError as e:  # an external checkpoint not given
                    ft[(row.key, f)] = f"({e})"
        return {"pretraining": pre, "finetune": ft}

    def fill_from_workdirs(self) -> int:
        """Completes results lines written by earlier versions from their
        workdirs, where these are still at hand: adds a missing `train_loss`
        (from loss_history.json) and puts `per_class_iou` back in the
        dataset's class order (from the run's evaluation report; lines were
        once written with sorted keys). Rewrites results.jsonl if any line
        changed; returns how many did."""
        changed = {}
        for record in self.results:
            if writers.is_remote(record["workdir"]):
                continue
            workdir = os.path.join(self.out, record["workdir"])
            before = json.dumps(record)
            curve = None if record.get("train_loss") else loss_curve(workdir)
            if curve:
                record["train_loss"] = curve
            per_class = record.get("per_class_iou")
            report = writers.read_json(os.path.join(
                workdir, "eval", f"{record.get('split', self.recipe.metric_split)}_"
                f"{int(record.get('steps') or 0):08d}.json")) or {}
            order = list(report.get("per_class") or {})
            if per_class and sorted(order) == sorted(per_class):
                record["per_class_iou"] = {name: per_class[name] for name in order}
            if json.dumps(record) != before:
                changed[self._result_key(record)] = record
        if changed:  # into results.jsonl as it is now (a harness may have added runs)
            self.results = [changed.get(self._result_key(r), r)
                            for r in self._read_jsonl("results.jsonl")]
            self._write_jsonl("results.jsonl", self.results)
        return len(changed)
