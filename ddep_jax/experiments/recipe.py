"""The label-efficiency harness's recipe types: `Pretraining` (a run whose
checkpoint initialises rows), `Row` (an initialisation of the grid),
`Recipe` (a protocol: pretraining runs, rows, label fractions, seeds and the
fine-tuning config) and `FinetuneRun` (one cell of one seed). Recipes are
defined in `experiments.protocols` and run by `experiments.label_efficiency`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True, eq=False)
class Pretraining:
    """A run whose checkpoint initialises rows.

    name: its id (OUT/pretrain/<name>); description: one line for the summary;
    config: a file under configs/, an absolute path, or a Python callable
    `get_config(arg) -> ConfigDict`; '' marks an external
    checkpoint, given as `--checkpoint=<name>=PATH` (e.g. the public
    R50+ViT-B/16 ImageNet-21k encoder); arg: the config's ':k=v' argument;
    overrides: dotted config keys set after loading; init_from: another
    pretraining whose workdir becomes this run's `init.checkpoint` (DDeP
    freezes the stage-1 encoder it reads).
    """

    name: str
    description: str
    config: str | Callable[[str | None], Any] = ""
    arg: str = ""
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    init_from: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class Row:
    """An initialisation of the fine-tuning grid.

    key: its id in run ids and results; name: the label in tables and plots;
    init: the stage-3 `init.mode` ('scratch', 'encoder', 'pretrained');
    pretraining: the `Pretraining` it reads ('' for scratch); group: 'main'
    (the Figure-6 table) or 'ablation' (the second table); overrides: dotted
    fine-tuning config keys of this row only (e.g. a noise-conditioned
    decoder needs `model.noise_conditioning`); decoder_pretraining: a
    `Pretraining` whose `encoder` collection becomes the decoder (×Net's
    pretrained decoder: a stage-1 classifier's backbone,
    `init.decoder_checkpoint`); '' for none. seeds: {fraction: seed count}
    of this row replacing the recipe's (0: the row is not run at that
    fraction), e.g. more seeds for the rows the paper's comparisons need,
    or ablations at one fraction only. arg: the fine-tuning config's ':k=v'
    argument for this row, after the recipe's `finetune_arg` (e.g.
    'arch=r50unet').
    """

    key: str
    name: str
    init: str
    pretraining: str = ""
    group: str = "main"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    decoder_pretraining: str = ""
    seeds: Mapping[str, int] = dataclasses.field(default_factory=dict)
    arg: str = ""

    @property
    def pretrainings(self) -> tuple[str, ...]:
        """The pretraining runs this row reads."""
        return tuple(p for p in (self.pretraining, self.decoder_pretraining) if p)


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    """A label-efficiency protocol: pretraining runs, rows, label fractions,
    seeds per fraction (a row's own `Row.seeds` replace them), and the
    fine-tuning config.

    overrides apply to every run of every stage (e.g. the model, which must
    match across stages to hand weights over); finetune_overrides to the
    fine-tuning runs; finetune_steps optionally sets `total_steps` per
    fraction. metric_split: the split whose final mIoU is the result (CamVid
    'test'; the paper reports Cityscapes, Pascal Context and ADE20K 'validation').
    references: the row keys differences are taken against (those the
      recipe has no row for are left out): by default Supervised, No
      pretraining and DeP, the paper's comparisons for DDeP (Fig. 6).
    claims: the papers' claims about pairs of rows (`claims.Claim`), checked
      in summary.md.
    """

    name: str
    description: str
    finetune_config: str | Callable[[str | None], Any]
    rows: tuple[Row, ...]
    pretrainings: tuple[Pretraining, ...]
    fractions: tuple[str, ...]
    seeds: Mapping[str, int]
    finetune_arg: str = ""
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    finetune_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    finetune_steps: Mapping[str, int] = dataclasses.field(default_factory=dict)
    metric_split: str = "test"
    references: tuple[str, ...] = ("supervised", "scratch", "dep")
    claims: tuple[Any, ...] = ()

    def seeds_of(self, row: Row, fraction: str) -> int:
        """How many seeds `row` runs at `fraction` (its own count, else the
        recipe's)."""
        return int(row.seeds.get(fraction, self.seeds.get(fraction, 0)))

    def finetune_arg_of(self, row: Row) -> str:
        """The fine-tuning config's argument for `row`: the recipe's, then
        the row's."""
        return ",".join(a for a in (self.finetune_arg, row.arg) if a)

    def row(self, key: str) -> Row:
        return self._find("row", {r.key: r for r in self.rows}, key)

    def pretraining(self, name: str) -> Pretraining:
        return self._find("pretraining", {p.name: p for p in self.pretrainings}, name)

    def _find(self, what: str, items: Mapping[str, Any], name: str):
        if name not in items:
            raise ValueError(f"recipe {self.name!r} has no {what} {name!r}; "
                             f"{what}s: {list(items)}.")
        return items[name]

    def check(self) -> None:
        """Raises ValueError naming the first inconsistency (unknown
        pretraining, a fraction without seeds, a dependency cycle...)."""
        names = [p.name for p in self.pretrainings]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe {self.name!r}: pretraining names repeat: {names}.")
        keys = [r.key for r in self.rows]
        if len(set(keys)) != len(keys):
            raise ValueError(f"recipe {self.name!r}: row keys repeat: {keys}.")
        for p in self.pretrainings:
            seen, q = {p.name}, p
            while q.init_from:
                q = self.pretraining(q.init_from)
                if q.name in seen:
                    raise ValueError(f"recipe {self.name!r}: pretraining {p.name!r} "
                                     "depends on itself.")
                seen.add(q.name)
        for r in self.rows:
            if r.init not in ("scratch", "encoder", "pretrained"):
                raise ValueError(f"recipe {self.name!r}, row {r.key!r}: init "
                                 f"{r.init!r} is not scratch|encoder|pretrained.")
            if (r.init == "scratch") != (not r.pretraining):
                raise ValueError(f"recipe {self.name!r}, row {r.key!r}: init "
                                 f"{r.init!r} needs a pretraining iff not scratch.")
            if r.pretraining:
                self.pretraining(r.pretraining)
            if r.decoder_pretraining:
                self.pretraining(r.decoder_pretraining)
            unknown = set(r.seeds) - set(self.fractions)
            if unknown:
                raise ValueError(f"recipe {self.name!r}, row {r.key!r}: seeds for "
                                 f"{sorted(unknown)}, not fractions of the recipe "
                                 f"{list(self.fractions)}.")
        for f in self.fractions:
            if max(self.seeds_of(r, f) for r in self.rows) < 1:
                raise ValueError(f"recipe {self.name!r}: fraction {f!r} has no seeds "
                                 "(in the recipe's seeds or any row's).")
        keys = {r.key for r in self.rows}
        for c in self.claims:
            missing = {c.row, c.reference} - keys
            if missing:
                raise ValueError(f"recipe {self.name!r}: claim {c.text!r} names "
                                 f"{sorted(missing)}, not rows of the recipe.")


def fraction_slug(fraction: str) -> str:
    """'1/30' -> '1-30', '100%' -> '100pct' (folder names)."""
    return fraction.replace("/", "-").replace("%", "pct")


@dataclasses.dataclass(frozen=True)
class FinetuneRun:
    row: str
    fraction: str
    seed: int

    @property
    def id(self) -> str:
        return f"finetune/{self.row}/{fraction_slug(self.fraction)}/s{self.seed}"
