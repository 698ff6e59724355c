"""The label-efficiency harness's summary.md (its figures: `figures`).

`summary_markdown(recipe, results, pretraining_records)` opens with the two
tables a user reads first (`claims`: the ranking at each fraction and the
papers' claims checked one by one), then formats the per-cell
mean +- std (percent mIoU), each row's difference against the recipe's
reference rows with a 95% confidence interval over seeds, the sensitivity
check per fraction (the criterion at the lowest), per-class IoU per fraction,
what each method costs and the CPU hours.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Mapping, Sequence

from ddep_jax.experiments import claims, stats


def cells_by_row(results: Sequence[Mapping]) -> dict[tuple[str, str], dict[int, float]]:
    """{(row, fraction): {seed: mIoU in percent}}."""
    cells: dict[tuple[str, str], dict[int, float]] = collections.defaultdict(dict)
    for r in results:
        cells[(r["row"], r["fraction"])][int(r["seed"])] = 100.0 * float(r["miou"])
    return cells


def labelled_images(results: Sequence[Mapping]) -> dict[str, int]:
    """{fraction: labelled images} as the runs recorded them."""
    return {r["fraction"]: r["labelled_images"] for r in results
            if r.get("labelled_images")}


def difference_text(row: Mapping[int, float] | None,
                    reference: Mapping[int, float] | None) -> str:
    """'+d [low, high]' (95% CI; '*' where it excludes 0) or '-'."""
    if not row or not reference:
        return "-"
    d = stats.difference(row, reference)
    star = "*" if d.significant else ""
    return (f"{stats.fmt(d.mean, True)} [{stats.fmt(d.low, True)}, {stats.fmt(d.high, True)}]{star} "
            f"({d.method}, n={d.n})")


def _header(recipe, labelled: Mapping[str, int]) -> list[str]:
    cols = [f"{f} ({labelled[f]} images)" if f in labelled else f
            for f in recipe.fractions]
    return ["| initialisation | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 1) + "|"]


def summary_markdown(recipe, results: Sequence[Mapping],
                     pretraining_records: Sequence[Mapping] = (), *,
                     total_runs: int | None = None,
                     failures: Sequence[Mapping] = (),
                     commands: Mapping[str, Mapping] | None = None) -> str:
    """The summary.md text of a recipe's results so far (see the module
    docstring). mIoU in percent; std is the sample std over seeds (ddof 1).
    `commands`: {'pretraining': {name: command}, 'finetune': {(row key,
    fraction): command of seed 0}} for the "Reproduce" section."""
    cells = cells_by_row(results)
    labelled = labelled_images(results)
    split = recipe.metric_split
    cpu_ft = sum(r.get("cpu_seconds") or 0 for r in results) / 3600
    cpu_pre = sum((r.get("cpu_seconds") or 0)  # reruns on a new machine included
                  + sum(e.get("cpu_seconds") or 0 for e in r.get("earlier", ()))
                  for r in pretraining_records) / 3600
    incomplete = any(r.get("cpu_seconds_complete") is False
                     for r in [*results, *pretraining_records])
    lines = [f"# Label efficiency: `{recipe.name}`", "", recipe.description, "",
             f"Metric: {split}-split mIoU (%), mean ± sample std over seeds (n = "
             "seeds). A seed sets the labelled subset, the initialisation and the "
             "data order; rows with the same seed share their labelled images.", "",
             f"Fine-tuning runs finished: {len(results)}"
             + (f" of {total_runs}" if total_runs else "")
             + f". CPU time: pretraining {cpu_pre:.2f} h, fine-tuning {cpu_ft:.2f} h"
             + (" (some runs were killed before their CPU time was counted: "
                "lower bounds)" if incomplete else "") + "."]
    lines += claims.ranking_table(recipe, cells)
    lines += claims.ranking_table(recipe, cells, group="ablation")
    lines += claims.claims_table(recipe, cells)
    lines += _reproducibility(results, pretraining_records)
    groups = [("main", "Initialisations"), ("ablation", "Ablations")]
    for group, title in groups:
        rows = [r for r in recipe.rows if r.group == group]
        if not rows:
            continue
        lines += ["", f"## {title}", "", *_header(recipe, labelled)]
        for row in rows:
            lines.append(f"| {row.name} | " + " | ".join(
                stats.cell_text(cells.get((row.key, f))) for f in recipe.fractions) + " |")
        for ref_key in recipe.references:
            try:
                ref = recipe.row(ref_key)
            except ValueError:
                continue
            lines += ["", f"Difference against {ref.name} (percentage points, 95% "
                      "confidence interval over seeds; * = excludes 0):", "",
                      *_header(recipe, labelled)]
            for row in rows:
                if row.key == ref_key:
                    continue
                lines.append(f"| {row.name} | " + " | ".join(
                    difference_text(cells.get((row.key, f)), cells.get((ref_key, f)))
                    for f in recipe.fractions) + " |")
    lines += _costs(recipe, results, pretraining_records)
    lines += _sensitivity(recipe, cells)
    lines += _per_class(recipe, results)
    if pretraining_records:
        lines += ["", "## Pretraining runs", "",
                  "| name | what | config | steps | final figures | CPU h |",
                  "|---|---|---|---|---|---|"]
        for p in pretraining_records:
            figures = ", ".join(f"{k} {v:.4g}" for k, v in (p.get("final") or {}).items())
            lines.append(f"| {p['name']} | {p.get('description', '')} | "
                         f"`{p['config']}` | {p.get('steps')} | {figures} | "
                         f"{(p.get('cpu_seconds') or 0) / 3600:.2f} |")
            for e in p.get("earlier", ()):
                figures = ", ".join(f"{k} {v:.4g}" for k, v in (e.get("final") or {}).items())
                lines.append(f"| {p['name']} (an earlier run of the same config) | | | "
                             f"{e.get('steps')} | {figures} | "
                             f"{(e.get('cpu_seconds') or 0) / 3600:.2f} |")
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- `{f['run']}`: {f['error']}"
                                               for f in failures]
    if commands:
        lines += _reproduce(recipe, commands)
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class MethodCost:
    """What one row costs, from the records.

    pretraining: (name, CPU hours or None when not run yet, True when that
      figure is a lower bound: an invocation was killed before it was
      counted) for each pretraining run the row reads, its `init_from`
      chain included (e.g. stage 1, then DDeP);
    finetune_seconds_per_step: the fine-tuning's CPU seconds per step,
      all-in (compile and evaluations included), mean over its `runs`
      (nan when none is recorded).
    """

    pretraining: tuple[tuple[str, float | None, bool], ...]
    finetune_seconds_per_step: float
    runs: int

    @property
    def pretraining_hours(self) -> float:
        """The recorded pretraining CPU hours summed (0 for none)."""
        return sum(h for _, h, _ in self.pretraining if h is not None)


def method_costs(recipe, results: Sequence[Mapping],
                 pretraining_records: Sequence[Mapping]) -> dict[str, MethodCost]:
    """{row key: MethodCost} for every row with a recorded fine-tuning run or
    pretraining (a stage 1 shared by several rows is counted in each)."""
    recorded = {p["name"]: p for p in pretraining_records}

    def chain(name: str) -> list[str]:
        names = []
        while name and name not in names:
            names.insert(0, name)
            try:
                name = recipe.pretraining(name).init_from
            except ValueError:
                break
        return names

    costs = {}
    for row in recipe.rows:
        runs = [r for r in results if r.get("row") == row.key and r.get("cpu_seconds")
                and r.get("steps")]
        names = list(dict.fromkeys(n for p in row.pretrainings for n in chain(p)))
        if not runs and not any(n in recorded for n in names):
            continue
        parts = []
        for n in names:
            rec = recorded.get(n)
            parts.append((n, (rec.get("cpu_seconds") or 0) / 3600 if rec else None,
                          bool(rec and rec.get("cpu_seconds_complete") is False)))
        per_step = [r["cpu_seconds"] / r["steps"] for r in runs]
        costs[row.key] = MethodCost(tuple(parts),
                                    sum(per_step) / len(per_step) if per_step else math.nan,
                                    len(per_step))
    return costs


def _costs(recipe, results: Sequence[Mapping],
           pretraining_records: Sequence[Mapping]) -> list[str]:
    """'## What each method costs': `method_costs` as a table."""
    lines = []
    for key, cost in method_costs(recipe, results, pretraining_records).items():
        parts = [f"{n} " + (f"{'>= ' if at_least else ''}{h:.2f}" if h is not None
                            else "not run") for n, h, at_least in cost.pretraining]
        lines.append(f"| {recipe.row(key).name} | {' + '.join(parts) or '-'} | "
                     + (f"{cost.finetune_seconds_per_step:.3f} ({cost.runs})"
                        if cost.runs else "-") + " |")
    if not lines:
        return []
    return ["", "## What each method costs", "",
            "CPU hours of the pretraining runs a row reads (stage 1 included where "
            "it is the row's own chain; a stage 1 shared by several rows is counted "
            "in each; '>=': a run killed before its CPU time was counted) and the "
            "fine-tuning's CPU seconds per step, all-in (compile and evaluations "
            "included; mean over its runs, n in brackets).", "",
            "| row | pretraining CPU h | fine-tuning CPU s / step (n) |",
            "|---|---|---|", *lines]


def _reproducibility(results: Sequence[Mapping],
                     pretraining_records: Sequence[Mapping]) -> list[str]:
    """Which machine fingerprints (`label_efficiency.machine_fingerprint`)
    the records come from: a run is bit-identical only on the same one."""
    kinds: dict[tuple, int] = {}
    unknown = 0
    for r in [*results, *pretraining_records]:
        m = r.get("machine")
        if not m:
            unknown += 1
            continue
        key = (m.get("cpus"), m.get("cpu_model"), m.get("cpu_isa"), m.get("xla_flags"))
        kinds[key] = kinds.get(key, 0) + 1
    if not kinds and not unknown:
        return []
    text = ("Reproducibility: a run repeated on the same machine kind, CPU count and "
            "XLA flags gives the same record bit for bit; another CPU count or "
            "instruction set changes the numbers from the second step on (like a "
            "new seed of the data order, smaller). Records by machine fingerprint: "
            + "; ".join([f"{n} on {cpus} CPU(s) of {model} (isa {isa}"
                         + (f", XLA_FLAGS {flags}" if flags else "") + ")"
                         for (cpus, model, isa, flags), n in kinds.items()]
                        + ([f"{unknown} older record(s) without a fingerprint"]
                           if unknown else [])))
    return ["", text + "."]


def _reproduce(recipe, commands: Mapping[str, Mapping]) -> list[str]:
    """One command per pretraining run and per (row, fraction) cell: what the
    harness runs, as `python -m ddep_jax.main` (OUT = the harness's --out)."""
    lines = ["", "## Reproduce", "",
             "Each run is one `python -m ddep_jax.main` command (OUT: the harness's "
             "`--out`; the harness itself runs them in this order and resumes). "
             "A fine-tuning cell's seed s is `--config.seed=s` in place of the "
             "`--config.seed=0` shown.", ""]
    for name, command in commands.get("pretraining", {}).items():
        lines += [f"- pretraining `{name}`:", "", "  ```", f"  {command}", "  ```"]
    for (row, fraction), command in commands.get("finetune", {}).items():
        lines += [f"- {recipe.row(row).name}, {fraction}:", "", "  ```",
                  f"  {command}", "  ```"]
    return lines


def _sensitivity(recipe, cells) -> list[str]:
    """Each reference effect against twice the pooled seed std of the
    main-table cells, per fraction with a pooled std (a cell of two seeds or
    more); the issue's criterion is read at the lowest fraction, the others
    show where the protocol separates the rows."""
    main = [r for r in recipe.rows if r.group == "main"]
    lines: list[str] = []
    for fraction in recipe.fractions:
        pooled = stats.pooled_std([list(cells[(r.key, fraction)].values())
                                   for r in main if (r.key, fraction) in cells])
        if math.isnan(pooled):
            continue
        title = (f"the lowest fraction ({fraction})"
                 if fraction == recipe.fractions[0] else fraction)
        lines += ["", f"## Sensitivity at {title}", "",
                  f"Pooled seed std of the initialisations at {fraction}: "
                  f"{stats.fmt(pooled)} mIoU points. An effect the protocol can see "
                  "should exceed twice it."]
        lines += _effects(main, cells, fraction, pooled)
        if fraction == recipe.fractions[0]:
            lines += _encoder_bar(cells, fraction, pooled)
        if pooled > 0:
            sizes = (3, 5, 10, 20)
            lines += ["", "Seeds it takes, at this seed std (independent seeds; "
                      "pairing narrows it when the seeds agree): the smallest "
                      "observed difference between two rows whose 95% interval "
                      "excludes 0 is " + ", ".join(
                          f"{stats.fmt(stats.detectable_difference(pooled, n))} at {n} seeds"
                          for n in sizes) + "; a true difference is found with 80% "
                      "power from " + ", ".join(
                          f"{stats.fmt(stats.detectable_difference(pooled, n, power=0.8))}"
                          f" at {n}" for n in sizes) + " seeds."]
    return lines


# The bar a CPU protocol must clear for its encoder to matter: Supervised -
# No pretraining at the lowest fraction at least this many pooled seed stds,
# its 95% interval excluding 0 (the paper's own gap at Cityscapes 1/30 is
# +28.9 points).
ENCODER_BAR = 3.0


def _encoder_bar(cells, fraction: str, pooled: float) -> list[str]:
    """Whether the protocol's encoder matters at `fraction`: Supervised - No
    pretraining against `ENCODER_BAR` x `pooled`, with its interval (the
    number first, then the verdict)."""
    supervised, scratch = cells.get(("supervised", fraction)), cells.get(("scratch", fraction))
    if not supervised or not scratch or not pooled > 0:
        return []
    d = stats.difference(supervised, scratch)
    ratio = d.mean / pooled
    met = ratio >= ENCODER_BAR and d.low > 0
    return ["", f"Does the encoder matter here? Supervised - No pretraining at {fraction}: "
                f"{stats.fmt(d.mean, True)} [{stats.fmt(d.low, True)}, "
                f"{stats.fmt(d.high, True)}] ({d.method}, n={d.n}) = {stats.fmt(ratio)} x "
                f"the pooled seed std; the bar is {ENCODER_BAR:g} x with the interval "
                f"excluding 0: {'met' if met else 'not met'}."]


def _effects(main, cells, fraction: str, pooled: float) -> list[str]:
    """One line per main row: its difference from No pretraining at
    `fraction` as a multiple of `pooled` and, paired, of the per-seed
    differences' sd."""
    scratch = cells.get(("scratch", fraction))
    lines = []
    for row in main:
        if row.key == "scratch" or not scratch or (row.key, fraction) not in cells:
            continue
        values = cells[(row.key, fraction)]
        d = stats.difference(values, scratch)
        ratio = d.mean / pooled if pooled else math.nan
        verdict = "n/a" if math.isnan(ratio) else ("yes" if ratio > 2 else "no")
        line = (f"- {row.name} - No pretraining: {stats.fmt(d.mean, True)} = "
                f"{stats.fmt(ratio)} x pooled std (> 2x: {verdict})")
        common = sorted(set(values) & set(scratch))
        if d.method == "paired":  # the seed-to-seed noise a paired comparison sees
            sd = stats.cell([values[k] - scratch[k] for k in common]).std
            if sd > 0:
                line += (f"; paired over {len(common)} seeds, the differences' sd is "
                         f"{stats.fmt(sd)}, the effect {stats.fmt(d.mean / sd)} x it")
        lines.append(line)
    return lines


def _per_class(recipe, results) -> list[str]:
    """Mean per-class IoU (%) per row, one table per fraction (the thin
    classes' IoU at 100% is the check that fine-tuning trains)."""
    lines: list[str] = []
    for fraction in recipe.fractions:
        per_row: dict[str, list[Mapping]] = collections.defaultdict(list)
        for r in results:
            if r["fraction"] == fraction and r.get("per_class_iou"):
                per_row[r["row"]].append(r["per_class_iou"])
        if not per_row:
            continue
        # Columns in the newest line's order (the dataset's class order; lines
        # of earlier versions were written with sorted keys).
        names = list(next(r["per_class_iou"] for r in reversed(results)
                          if r["fraction"] == fraction and r.get("per_class_iou")))
        lines += ["", f"## Per-class IoU at {fraction} (%, mean over seeds)", "",
                  "| initialisation | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for row in recipe.rows:
            if row.key not in per_row:
                continue
            vals = []
            for name in names:
                xs = [p[name] for p in per_row[row.key] if p.get(name) is not None]
                vals.append(f"{100 * sum(xs) / len(xs):.1f}" if xs else "-")
            lines.append(f"| {row.name} (n={len(per_row[row.key])}) | "
                         + " | ".join(vals) + " |")
    return lines
