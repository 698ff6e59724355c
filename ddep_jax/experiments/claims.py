"""The two tables a user reads first: the ranking of a recipe's rows at each
label fraction, and the papers' claims checked one by one.

Both are computed from the records alone (results.jsonl), so that
`--summary_only` rebuilds them. mIoU in percent; differences are
`stats.difference` (paired over shared seeds, else Welch), 95% intervals.

A `Claim` names two rows of a recipe, the relation a paper states between
them and the paper's own figures; `verdict` reads the interval of their
difference:

  relation '>'  (row better):   reproduced if the interval is above 0,
                                contradicted if it is below 0;
  relation '<'  (row worse):    the mirror image;
  relation '>=' (row no worse): contradicted if the interval is below 0,
                                reproduced if its low end is above -margin;
  relation '~'  (no effect):    contradicted if the interval excludes 0,
                                reproduced if it lies within +-margin;
  relation ''   (a comparison the papers make no claim about): no verdict;

and "not resolved at this protocol" otherwise (the interval is too wide
for the seeds run), "not run yet" where a cell has fewer than two seeds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from ddep_jax.experiments import stats

RELATIONS = (">", "<", ">=", "~", "")
REPRODUCED, CONTRADICTED, NOT_RESOLVED, NOT_RUN, NO_CLAIM = (
    "reproduced", "contradicted", "not resolved at this protocol", "not run yet",
    "no claim (comparison)")


@dataclasses.dataclass(frozen=True)
class Claim:
    """A paper's claim about two rows of a recipe.

    text: the claim in words; source: where it is made (paper, table or
    figure); paper: the paper's own figures (e.g. 'Cityscapes 1/30: 64.48 vs
    54.72 (+9.76)'; '' where the paper gives none); row, reference: row keys
    (`Row.key`), the claim is about `row - reference`; relation: see the
    module docstring; fraction: the label fraction it is checked at ('' =
    the recipe's lowest with at least two seeds in both rows); margin:
    percentage points for '>=' and '~'.
    """

    text: str
    source: str
    row: str
    reference: str
    relation: str = ">"
    paper: str = ""
    fraction: str = ""
    margin: float = 1.0

    def __post_init__(self):
        if self.relation not in RELATIONS:
            raise ValueError(f"Claim {self.text!r}: relation {self.relation!r} is not "
                             f"one of {RELATIONS}.")
        if self.margin < 0:
            raise ValueError(f"Claim {self.text!r}: margin {self.margin} < 0.")


def verdict(claim: Claim, d: stats.Difference | None) -> str:
    """The verdict on `claim` given the difference row - reference (None or
    an interval that is nan: fewer than two seeds)."""
    if d is None or math.isnan(d.low):
        return NOT_RUN
    low, high, m = d.low, d.high, claim.margin
    if claim.relation == "":
        return NO_CLAIM
    if claim.relation == ">":
        return REPRODUCED if low > 0 else CONTRADICTED if high < 0 else NOT_RESOLVED
    if claim.relation == "<":
        return REPRODUCED if high < 0 else CONTRADICTED if low > 0 else NOT_RESOLVED
    if claim.relation == ">=":
        return CONTRADICTED if high < 0 else REPRODUCED if low > -m else NOT_RESOLVED
    # '~'
    if low > 0 or high < 0:
        return CONTRADICTED
    return REPRODUCED if -m <= low and high <= m else NOT_RESOLVED


def _interval(d: stats.Difference) -> str:
    return (f"{stats.fmt(d.mean, True)} [{stats.fmt(d.low, True)}, "
            f"{stats.fmt(d.high, True)}] (n={d.n})")


def claim_fraction(claim: Claim, fractions: Sequence[str],
                   cells: Mapping[tuple[str, str], Mapping[int, float]]) -> str:
    """The fraction `claim` is checked at: its own, else the lowest of
    `fractions` (the recipe's order, lowest first) where both rows have at
    least two seeds, else the first where both rows were run at all."""
    if claim.fraction:
        return claim.fraction
    both = [f for f in fractions
            if cells.get((claim.row, f)) and cells.get((claim.reference, f))]
    enough = [f for f in both if len(cells[(claim.row, f)]) > 1
              and len(cells[(claim.reference, f)]) > 1]
    return (enough or both or [fractions[0]])[0]


def claims_table(recipe, cells: Mapping[tuple[str, str], Mapping[int, float]]) -> list[str]:
    """Markdown lines: one row per claim of `recipe.claims` whose two rows
    the recipe has, with the paper's figures, ours (difference and interval)
    and the verdict."""
    keys = {r.key for r in recipe.rows}
    claims = [c for c in getattr(recipe, "claims", ()) if c.row in keys
              and c.reference in keys]
    if not claims:
        return []
    lines = ["", "## The papers' claims, checked", "",
             "Ours: row - reference in mIoU points at the fraction named, 95% "
             "interval over seeds (paired where the seeds agree). Verdicts: "
             "reproduced / contradicted / not resolved at this protocol (the "
             "interval is too wide for the seeds run); '>=' and '~' use the "
             "margin shown.", "",
             "| claim | source | the paper | fraction | ours | verdict |",
             "|---|---|---|---|---|---|"]
    for c in claims:
        f = claim_fraction(c, recipe.fractions, cells)
        row, ref = cells.get((c.row, f)), cells.get((c.reference, f))
        d = stats.difference(row, ref) if row and ref else None
        relation = {">": ">", "<": "<", ">=": f">= (margin {c.margin:g})",
                    "~": f"~ (margin {c.margin:g})", "": "vs"}[c.relation]
        what = (f"{c.text}: {recipe.row(c.row).name} {relation} "
                f"{recipe.row(c.reference).name}")
        ours = _interval(d) if d is not None else "-"
        lines.append(f"| {what} | {c.source} | {c.paper or '-'} | {f} | {ours} | "
                     f"{verdict(c, d)} |")
    return lines


def ranking_table(recipe, cells: Mapping[tuple[str, str], Mapping[int, float]],
                  group: str = "main") -> list[str]:
    """Markdown lines: at each fraction, the `group` rows with results,
    sorted by mean mIoU, each with its difference to DDeP and to Supervised
    (where the recipe has those rows) and whether it is indistinguishable
    from the best row (the 95% interval of its difference to the best
    includes 0). The ablations' ranking ('ablation') includes DDeP."""
    keys = {r.key for r in recipe.rows}
    rows = [r for r in recipe.rows if r.group == group
            or (group != "main" and r.key == "ddep")]  # the ablations beside DDeP
    if not any(cells.get((r.key, f)) for r in rows if r.group == group
               for f in recipe.fractions):
        return []
    refs = [k for k in ("ddep", "supervised") if k in keys]
    out = []
    for f in recipe.fractions:
        present = [(stats.cell(list(cells[(r.key, f)].values())), r) for r in rows
                   if cells.get((r.key, f))]
        if not present:
            continue
        present.sort(key=lambda cr: -cr[0].mean)
        best = present[0][1]
        out += ["", f"### {f}", "",
                "| rank | initialisation | mIoU | "
                + "".join(f"vs {recipe.row(k).name} | " for k in refs)
                + "indistinguishable from the best |",
                "|---" * (4 + len(refs)) + "|"]
        for rank, (_, r) in enumerate(present, 1):
            diffs = []
            for k in refs:
                ref = cells.get((k, f))
                if k == r.key or not ref:
                    diffs.append("-")
                    continue
                d = stats.difference(cells[(r.key, f)], ref)
                diffs.append(_interval(d) + ("*" if d.significant else ""))
            if r is best:
                tie = "best"
            else:
                d = stats.difference(cells[(r.key, f)], cells[(best.key, f)])
                tie = ("n/a (one seed)" if math.isnan(d.low)
                       else "no" if d.significant else "yes")
            out.append(f"| {rank} | {r.name} | {stats.cell_text(cells[(r.key, f)])} | "
                       + "".join(f"{x} | " for x in diffs) + f"{tie} |")
    if not out:
        return []
    title = "Ranking" if group == "main" else "Ranking of the ablations"
    return ["", f"## {title}", "",
            f"Rows sorted by mean {recipe.metric_split} mIoU (%) at each fraction; "
            "differences in "
            "points with 95% intervals (* = excludes 0); a row is "
            "indistinguishable from the best when the interval of its "
            "difference to the best row includes 0."] + out


# The claims of the DDeP paper (PAPER.md's figures), the SSL4DP draft's VOC
# table and the ×Net paper, about the rows of this project's recipes by row
# key (scratch, supervised, dep, ddep, the pretext tasks, the ablations of
# camvid_cpu_v2, ×Net and Table 7's pair). A recipe lists those it checks
# (`Recipe.claims`); the summary shows the ones whose two rows it has.
_SSL4DP_VOC = "SSL4DP draft, VOC table (MoCo encoder + pretext, MoCoFCN head)"
PAPER_CLAIMS = (
    Claim("pretraining the encoder pays", "DDeP Fig. 6", "supervised", "scratch", ">",
          "Cityscapes 1/30: 54.72 vs 25.79 (+28.93)"),
    Claim("DDeP beats Supervised with few labels", "DDeP Fig. 6", "ddep", "supervised",
          ">", "Cityscapes 1/30: 64.48 vs 54.72 (+9.76); 1/8: 73.21 vs 72.56 (+0.65)"),
    Claim("DDeP beats DeP", "DDeP Fig. 6", "ddep", "dep", ">",
          "Cityscapes 1/30: 64.48 vs 61.79 (+2.69); 1/8: 73.21 vs 70.36 (+2.85)"),
    Claim("a fixed noise level is no worse than one sampled per example", "DDeP Table 4",
          "ddep", "ddep_sampled", ">=", "fixed gamma beats gamma sampled in [0.9, 0.95]",
          fraction="1/8"),
    Claim("predicting the noise beats predicting the image", "DDeP Table 1", "ddep",
          "ddep_x", ">", "eps clearly better than x without an input-output skip",
          fraction="1/8"),
    Claim("scaled noise is no worse than simple noise", "DDeP Fig. 5", "ddep",
          "ddep_simple", ">=", "scaled additive noise used for all main results",
          fraction="1/8"),
    Claim("conditioning on the noise level gives nothing", "DDeP Sec. 4.4", "ddep_cond",
          "ddep_sampled", "~", "no gain from conditioning", fraction="1/8"),
    Claim("DDeP still beats Supervised with a 2x decoder", "DDeP Fig. 6", "ddep_2x",
          "supervised_2x", ">", "Cityscapes 2x, 1/8: 73.81 vs 72.84 (+0.97)",
          fraction="1/8"),
    Claim("the ResNet-50 U-Net gains from DDeP", "DDeP Table 7", "r50unet_ddep",
          "r50unet_supervised", ">",
          "Pascal Context 1%: 9.63 vs 6.09 (+3.54); 100%: 46.07 vs 45.21 (+0.86)"),
    Claim("×Net's pretrained decoder beats a random one", "×Net overview figure "
          "(qualitative ablation)", "xnet", "xnet_random", ">",
          "sharper masks with the pretrained decoder (no figures)"),
    Claim("patch rotation after the encoder lowers mIoU", _SSL4DP_VOC, "rotation",
          "supervised", "<", "VOC: 70.82 vs 72.65 (-1.83)"),
    Claim("encoder-decoder MoCo after the encoder lowers mIoU", _SSL4DP_VOC, "moco",
          "supervised", "<", "VOC: 71.42 vs 72.65 (-1.23)"),
    Claim("patch-level MoCo after the encoder raises mIoU", _SSL4DP_VOC, "patch_moco",
          "supervised", ">", "VOC: 73.27 vs 72.65 (+0.62)"),
    Claim("patch-level encoder-decoder MoCo: excluding overlapping negatives",
          "this project's correction", "patch_moco_dec", "patch_moco_dec_overlap1", "",
          fraction="1/8"),
    *(Claim(f"{what} vs No pretraining", "SSL4DP draft (pretext task)", key, "scratch",
            ">") for key, what in (("rotation", "patch rotation"),
                                   ("moco", "encoder-decoder MoCo"),
                                   ("patch_moco_dec", "patch-level encoder-decoder MoCo"),
                                   ("patch_moco", "patch-level MoCo"))),
    *(Claim(f"{what} vs DDeP", "comparison", key, "ddep", "")
      for key, what in (("rotation", "patch rotation"), ("moco", "encoder-decoder MoCo"),
                        ("patch_moco_dec", "patch-level encoder-decoder MoCo"),
                        ("patch_moco", "patch-level MoCo"))),
)
