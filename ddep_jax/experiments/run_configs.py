"""Each run's config and the one `python -m ddep_jax.main` command that
rebuilds it: a recipe's config file or callable, its argument, then the
recipe's, the row's and the run's overrides (seed, label fraction, initial
checkpoints, steps). `RunConfigs` is a mix-in of `label_efficiency.Harness`."""

from __future__ import annotations

import os
import pathlib
import shlex
from typing import Any, Mapping

from ddep_jax import config_lib
from ddep_jax.experiments.recipe import FinetuneRun

REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
"""The repository's configs/ folder (recipes name files in it)."""


def _flag_value(value) -> str:
    """A config value as `--config.KEY=` takes it (tuples as (a,b,...))."""
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


class RunConfigs:
    """Configs and commands of a recipe's runs (see `Harness`)."""

    def _load(self, name, arg: str, *overrides: Mapping[str, Any]):
        data = {"data.data_dir": self.data_dir} if self.data_dir else {}
        if callable(name):
            config = name(arg or None)
            for o in (self.recipe.overrides, *overrides, data):
                config_lib.apply_overrides(config, o)
            return config
        path = name if os.path.isabs(name) else str(self.configs_dir / name)
        return config_lib.load_config(path, arg, self.recipe.overrides, *overrides, data)

    def _pretraining_overrides(self, name: str) -> dict:
        p = self.recipe.pretraining(name)
        o = {**self.recipe.overrides, **p.overrides}
        if p.init_from:
            o["init.checkpoint"] = self.pretrain_dir(p.init_from)
        if self.data_dir:
            o["data.data_dir"] = self.data_dir
        return o

    def pretraining_config(self, name: str):
        p = self.recipe.pretraining(name)
        return self._load(p.config, p.arg, p.overrides, self._pretraining_overrides(name))

    def _finetune_overrides(self, run: FinetuneRun) -> dict:
        """Every key a fine-tuning run sets on its config file's config, in
        order (`finetune_config` applies them, `finetune_command` prints them)."""
        row = self.recipe.row(run.row)
        steps = self.recipe.finetune_steps.get(run.fraction)
        o = {**self.recipe.overrides, **self.recipe.finetune_overrides, **row.overrides}
        if steps:
            o["total_steps"] = steps
        o.update({"seed": run.seed,
                  "data.subset_seed": -1,  # the labelled subset follows the seed
                  "data.label_fraction": run.fraction, "init.mode": row.init,
                  "init.checkpoint": (self.pretrain_dir(row.pretraining)
                                      if row.pretraining else "")})
        if row.decoder_pretraining:
            o["init.decoder_checkpoint"] = self.pretrain_dir(row.decoder_pretraining)
            o["init.decoder_collection"] = "encoder"
        if self.data_dir:
            o["data.data_dir"] = self.data_dir
        base = self._load(self.recipe.finetune_config, self.recipe.finetune_arg_of(row),
                          self.recipe.finetune_overrides, row.overrides)
        split = self.recipe.metric_split
        if split != base.eval.split and split not in base.eval.final_splits:
            o["eval.final_splits"] = (*base.eval.final_splits, split)
        return o

    def finetune_config(self, run: FinetuneRun):
        return self._load(self.recipe.finetune_config,
                          self.recipe.finetune_arg_of(self.recipe.row(run.row)),
                          self._finetune_overrides(run))

    def _command(self, config_spec, arg: str, overrides: Mapping[str, Any],
                 workdir: str) -> str:
        """The `python -m ddep_jax.main` command that runs a config with
        `overrides` into `workdir`; OUT's own path is written OUT."""
        if callable(config_spec):
            return (f"(config {getattr(config_spec, '__qualname__', config_spec)} is a "
                    "Python callable, not a file: no command line)")
        path = config_spec
        if not os.path.isabs(path):
            path = os.path.relpath(self.configs_dir / path, REPO_CONFIGS.parent)
        flags = [f"--config={path}" + (f":{arg}" if arg else "")]
        flags += [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
        flags.append(f"--workdir={workdir}")
        text = "python -m ddep_jax.main " + " ".join(shlex.quote(f) for f in flags)
        return text.replace(self.out.rstrip("/") + "/", "OUT/")

    def pretraining_command(self, name: str) -> str:
        """The one command that runs pretraining `name` as the harness does."""
        p = self.recipe.pretraining(name)
        if not p.config:
            return f"(external checkpoint: --checkpoint={name}=PATH)"
        return self._command(p.config, p.arg, self._pretraining_overrides(name),
                             self.pretrain_dir(name))

    def finetune_command(self, run: FinetuneRun) -> str:
        """The one command that runs fine-tuning cell `run` as the harness
        does (after the pretraining runs it reads)."""
        return self._command(self.recipe.finetune_config,
                             self.recipe.finetune_arg_of(self.recipe.row(run.row)),
                             self._finetune_overrides(run), self.finetune_dir(run))
