"""The label-efficiency figures, drawn with matplotlib (Agg, no display):
`plot` (Figure 6 of the paper: mean mIoU against labelled images per row,
one PNG per table: the initialisations and the ablations, with each row's
cost beside it) and `plot_curves`
(the fine-tuning runs' training loss, mean over seeds, per fraction)."""

from __future__ import annotations

import collections
import io
import math
from typing import Mapping, Sequence

from ddep_jax.common import writers
from ddep_jax.experiments import stats
from ddep_jax.experiments.report import cells_by_row, labelled_images, method_costs


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(recipe, results: Sequence[Mapping], rows: Sequence, path: str,
         pretraining_records: Sequence[Mapping] = ()) -> None:
    """Writes the Figure-6 PNG at `path`: mean mIoU (%) against labelled
    images (log x axis) per row, with a +- 1 std band and error bar (none for
    a single seed); the rows' points are spread a little along x so that
    their bars do not hide each other. Beside it, what each row costs
    (`report.method_costs`): its fine-tuning's CPU seconds per step as a
    bar, labelled with the CPU hours of the pretraining it reads."""
    plt = _pyplot()

    cells = cells_by_row(results)
    labelled = labelled_images(results)
    costs = method_costs(recipe, results, pretraining_records)
    costs = {r.key: costs[r.key] for r in rows if r.key in costs and costs[r.key].runs}
    if costs:
        fig, (ax, cost_ax) = plt.subplots(1, 2, figsize=(13.0, 4.4), dpi=120,
                                          gridspec_kw={"width_ratios": (2.4, 1.0)})
    else:
        fig, ax = plt.subplots(figsize=(8.4, 4.4), dpi=120)
    colours = {}
    ticks = []
    for index, row in enumerate(rows):
        xs, means, stds = [], [], []
        for f in recipe.fractions:
            values = cells.get((row.key, f))
            if not values or f not in labelled:
                continue
            c = stats.cell(list(values.values()))
            xs.append(labelled[f])
            means.append(c.mean)
            stds.append(0.0 if math.isnan(c.std) else c.std)
        if not xs:
            continue
        order = sorted(range(len(xs)), key=xs.__getitem__)
        xs = [xs[i] for i in order]
        means = [means[i] for i in order]
        stds = [stds[i] for i in order]
        ticks.extend(xs)
        shift = 1.0 + 0.025 * (index - (len(rows) - 1) / 2)  # on the log axis
        xs = [x * shift for x in xs]
        (line,) = ax.plot(xs, means, marker="o", label=row.name)
        colours[row.key] = line.get_color()
        ax.errorbar(xs, means, yerr=stds, fmt="none", ecolor=line.get_color(),
                    capsize=3, linewidth=1)
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                        [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ticks = sorted(set(ticks))
    if ticks:  # room around the points, also when one fraction has results
        ax.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)
    names = {v: k for k, v in labelled.items()}
    ax.set_xticks(ticks, [f"{t}\n({names.get(t, '')})" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labelled training images (log scale)")
    ax.set_ylabel(f"{recipe.metric_split} mIoU (%)")
    ax.set_title(f"{recipe.name}: mean ± 1 std over seeds")
    ax.grid(True, alpha=0.3)
    if costs:
        ax.legend(loc="best", fontsize="x-small")
        _cost_panel(cost_ax, recipe, costs, colours)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    writers.write_bytes(path, buffer.getvalue())


def _cost_panel(ax, recipe, costs: Mapping, colours: Mapping) -> None:
    """Horizontal bars, one per row of `costs` (only rows with fine-tuning
    runs, top to bottom in the recipe's order): fine-tuning CPU s / step,
    labelled with the pretraining CPU hours ('>=' where a figure is a lower
    bound; 'pretraining: not all run' where one is missing)."""
    keys = list(costs)
    ys = list(range(len(keys)))[::-1]
    widths = [costs[k].finetune_seconds_per_step for k in keys]
    ax.barh(ys, widths, color=[colours.get(k, "0.6") for k in keys], height=0.6)
    top = max(widths) if any(widths) else 1.0
    for y, k, w in zip(ys, keys, widths):
        cost = costs[k]
        if not cost.pretraining:
            label = "no pretraining"
        elif any(h is None for _, h, _ in cost.pretraining):
            label = "pretraining: not all run"
        else:
            at_least = ">= " if any(a for _, _, a in cost.pretraining) else ""
            label = f"pretraining {at_least}{cost.pretraining_hours:.2f} CPU h"
        ax.text(w + 0.02 * top, y, label, va="center", fontsize="x-small")
    ax.set_yticks(ys, [recipe.row(k).name for k in keys], fontsize="x-small")
    ax.set_xlim(0, top * 2.0)
    ax.set_xlabel("fine-tuning CPU s / step (all-in)")
    ax.set_title("what each row costs", fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)


def mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> tuple[list, list]:
    """Steps and the mean loss over the runs at each step all of them have
    (curves: [[step, loss], ...] per run, `label_efficiency.loss_curve`)."""
    common = set.intersection(*(set(step for step, _ in c) for c in curves))
    steps = sorted(common)
    by_run = [dict((step, loss) for step, loss in c) for c in curves]
    return steps, [sum(run[s] for run in by_run) / len(by_run) for s in steps]


def plot_curves(recipe, results: Sequence[Mapping], rows: Sequence, path: str) -> None:
    """Writes a PNG at `path` of each row's fine-tuning training loss against
    steps (the results lines' `train_loss` window means, mean over seeds),
    one panel per label fraction with curves."""
    plt = _pyplot()

    labelled = labelled_images(results)
    curves = collections.defaultdict(list)
    for r in results:
        if r.get("train_loss"):
            curves[(r["row"], r["fraction"])].append(r["train_loss"])
    fractions = [f for f in recipe.fractions
                 if any((row.key, f) in curves for row in rows)]
    if not fractions:
        return
    legend_in = 3.6  # inches to the right of the panels
    fig, axes = plt.subplots(1, len(fractions),
                             figsize=(3.6 * len(fractions) + legend_in, 3.6),
                             dpi=120, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, f in zip(axes[0], fractions):
        for index, row in enumerate(rows):
            runs = curves.get((row.key, f))
            if not runs:
                continue
            steps, loss = mean_curve(runs)
            if not steps:  # runs of different lengths share no step
                continue
            ax.plot(steps, loss, color=colours[index % len(colours)], label=row.name)
        images = f" ({labelled[f]} images)" if f in labelled else ""
        ax.set_title(f"{f}{images}", fontsize="medium")
        ax.set_xlabel("fine-tuning step")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("training loss (window mean)")
    handles = {}  # one legend entry per row, whichever panels it is in
    for ax in axes[0]:
        for h, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, h)
    # Beside the panels (the reserved width fits the longest row names).
    fig.legend(list(handles.values()), list(handles), loc="center left",
               bbox_to_anchor=(1 - legend_in / fig.get_figwidth() + 0.005, 0.5),
               fontsize="small")
    fig.suptitle(f"{recipe.name}: fine-tuning loss, mean over seeds", fontsize="medium")
    fig.tight_layout(rect=(0, 0, 1 - legend_in / fig.get_figwidth(), 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    writers.write_bytes(path, buffer.getvalue())
