"""The documentation's commands work: every fenced ```bash / ```sh /
```console block of README.md and docs/*.md is split into commands, and

- every `python -m ddep_jax.<module>` names a module that exists, and its
  flags parse: `ddep_jax.main`'s with absl and ml_collections' config flags,
  in this process (the config file loads with its arguments, every
  `--config.a.b=v` names a key and parses as its type); the other absl entry
  points' and the benchmark scripts' against the flags they define (read in
  one child process, which runs each module's `__main__` up to `app.run`),
  enum values included;
- the label-efficiency harness runs for real with `--out` in a temporary
  folder and `--list` (`--summary_only` runs as written, on the committed
  records it copies);
- the launch scripts run for real in dry-run mode (`--dry_run` /
  `DRY_RUN=1`); every `--config=configs/...` they pass loads;
- any other program is one of a known list (gcloud, pip, tar, ...).

Also: README.md has at most 250 lines and starts with the CI's two set-up
commands, no page names a path in `../shared`, LICENSE, CITATION.cff and
CHANGELOG.md exist, and every relative link (and its #anchor) resolves.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, subprocess_env

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = ("bash", "sh", "shell", "console")
# Programs the docs may name that this test does not run (cloud, package and
# file tools); anything else is an error, so that a misspelt command shows.
EXTERNAL = {"gcloud", "pip", ".venv/bin/pip", "tar", "git", "mkdir", "cp", "cat", "sbatch",
            "echo", "wandb", "sudo", "export", "set", "cd", "ls", "srun", "scontrol"}
# The environment the documented shell variables expand in.
DOC_ENV = {"PROJECT": "my-project", "ZONE": "us-central2-b", "TPU_NAME": "ddep-v4",
           "ACCELERATOR": "v4-32", "BUCKET": "my-ddep-bucket", "B": "gs://my-ddep-bucket",
           "TFDS_DATA_DIR": "/tmp/tfds", "HOME": os.environ.get("HOME", "/tmp"),
           "USER": "user", "SLURM_JOB_ID": "1"}
CI_COMMANDS = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m "
    "ddep_jax.main --config=configs/ddep_default.py --workdir=workdirs/default",
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
    ".venv/bin/python -m pytest -q tests",
)


# ------------------------------------------------------------- extraction
def fenced_blocks(path) -> list[tuple[str, str]]:
    """(language, dedented text) of every fenced block of a Markdown file."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, body = m.group(1), m.group(2), []
        i += 1
        while i < len(lines) and not re.match(rf"^{indent}```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        blocks.append((lang, textwrap.dedent("\n".join(body))))
    return blocks


def logical_lines(text: str, lang: str) -> list[str]:
    """Lines with continuations joined, console prompts stripped, heredoc
    bodies dropped."""
    if lang == "console":
        text = "\n".join(line[2:] for line in text.splitlines() if line.startswith("$ "))
    out, heredoc = [], None
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        m = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
        if m:
            heredoc = m.group(1)
            line = line[:m.start()]
        if line.strip():
            out.append(line)
    return out


_SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
_REDIRECTS = {">", ">>", "<", ">&", "&>", "<&", ">|"}


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, redirections removed."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    tokens, result, current = list(lex), [], []
    skip = False
    for k, tok in enumerate(tokens):
        if skip:
            skip = False
            continue
        if tok in _SEPARATORS:
            if current:
                result.append(current)
            current = []
        elif tok in _REDIRECTS:
            if current and current[-1].isdigit():
                current.pop()
            skip = True
        else:
            current.append(tok)
    if current:
        result.append(current)
    return result


def doc_commands():
    """(page, argv, env assignments) of every documented command; `export`
    and assignment-only commands update the page's environment."""
    found = []
    for page in PAGES:
        env = dict(DOC_ENV)
        for lang, text in fenced_blocks(page):
            if lang not in SHELL_LANGS:
                continue
            for line in logical_lines(text, lang):
                for argv in commands(line):
                    assigned = {}
                    while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
                        k, v = argv.pop(0).split("=", 1)
                        assigned[k] = expand(v, {**env, **assigned})
                    if argv and argv[0] == "export":
                        for a in argv[1:]:
                            if "=" in a:
                                k, v = a.split("=", 1)
                                env[k] = expand(v, env)
                    if not argv:
                        env.update(assigned)
                        continue
                    found.append((page.relative_to(REPO).as_posix(), argv,
                                  {**env, **assigned}, assigned))
    return found


def expand(word: str, env: dict) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), word)


def strip_wrappers(argv: list[str]) -> list[str]:
    argv = list(argv)
    while argv and argv[0] in ("nice", "nohup", "time", "setsid", "exec"):
        argv.pop(0)
        if argv and argv[0] == "-n":
            argv = argv[2:]
    return argv


def is_python(word: str) -> bool:
    return re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", word) is not None


DOC_COMMANDS = doc_commands()


def by_kind():
    """Documented commands grouped: 'module' (python -m ddep_jax.X), 'script'
    (python path.py), 'launch' (launch/...), 'external', 'unknown'."""
    kinds = {k: [] for k in ("module", "script", "launch", "external", "unknown")}
    for page, argv, env, assigned in DOC_COMMANDS:
        argv = [expand(a, env) for a in strip_wrappers(argv)]
        if not argv:
            continue
        prog = argv[0]
        if is_python(prog) and len(argv) > 2 and argv[1] == "-m":
            if argv[2].startswith("ddep_jax"):
                kinds["module"].append((page, argv[2], argv[3:], env))
            elif argv[2] in ("venv", "pytest", "pip"):
                kinds["external"].append((page, argv))
            else:
                kinds["unknown"].append((page, argv))
        elif is_python(prog) and len(argv) > 1 and argv[1].endswith(".py"):
            kinds["script"].append((page, argv[1], argv[2:], env))
        elif prog == "bash" and len(argv) > 1 and argv[1].startswith("launch/"):
            kinds["launch"].append((page, argv[1:], env, assigned))
        elif prog.startswith("launch/"):
            kinds["launch"].append((page, argv, env, assigned))
        elif prog in EXTERNAL:
            kinds["external"].append((page, argv))
        else:
            kinds["unknown"].append((page, argv))
    return kinds


KINDS = by_kind()


def flag_items(args: list[str]) -> list[tuple[str, str | None]]:
    """(name, value or None) of every --flag in args, up to a bare '--'."""
    items = []
    for a in args:
        if a == "--":
            break
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            items.append((name, value if eq else None))
    return items


def config_arg(value: str) -> tuple[str, str | None]:
    path, _, arg = value.partition(":")
    return path, arg or None


# ------------------------------------------------------------------ tests
def test_pages_found_and_commands_extracted():
    names = {p.name for p in PAGES}
    assert {"README.md", "getting-started.md", "training.md", "methods.md", "results.md",
            "label-efficiency.md", "own-data-and-export.md", "scaling-out.md",
            "performance.md", "architecture.md", "errors-and-recovery.md", "DATASETS.md",
            "LAUNCH.md"} <= names
    assert len(KINDS["module"]) >= 20, KINDS["module"]
    assert KINDS["launch"], "no launch command found"


def test_readme_shape_and_repository_files():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    blocks = [t for lang, t in fenced_blocks(REPO / "README.md") if lang == "bash"]
    assert tuple(blocks[:2]) == CI_COMMANDS
    for page in PAGES:
        assert "../shared" not in page.read_text(), page
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    cff = (REPO / "CITATION.cff").read_text()
    for needle in ("cff-version: 1.2.0", 'title: "ddep_jax"', "license: Apache-2.0",
                   'version: "0.1.0"', "preferred-citation:", "references:",
                   "Decoder Denoising Pretraining for Semantic Segmentation",
                   "arXiv:2205.11423", "Brempong"):
        assert needle in cff, needle
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and "## [0.1.0]" in changelog


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_relative_links_resolve():
    bad = []
    for page in PAGES + [REPO / "CHANGELOG.md"]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{page.name}: {target} (no heading #{anchor})")
    assert not bad, "\n".join(bad)


def test_no_unknown_programs():
    assert not KINDS["unknown"], "\n".join(f"{p}: {' '.join(a)}" for p, a in KINDS["unknown"])


def test_modules_exist():
    import importlib.util

    missing = sorted({f"{p}: {m}" for p, m, _, _ in KINDS["module"]
                      if importlib.util.find_spec(m) is None})
    assert not missing, missing


def _parse_main(args: list[str]):
    """Parses `python -m ddep_jax.main ARGS` as the entry point does, with a
    fresh FlagValues: main's own flags and the config file flag."""
    from absl import flags
    from ml_collections import config_flags

    import ddep_jax.main as main_module

    names = [f.name for f in flags.FLAGS.get_flags_for_module(main_module.__name__)]
    fv = flags.FlagValues()
    for name in names:
        if name == "config":
            config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                            sys_argv=["main", *args])
        else:
            fv[name] = copy.deepcopy(flags.FLAGS[name])
    with contextlib.chdir(REPO):  # the config paths are the repository's
        fv(["main", *args])
        fv.config  # noqa: B018 - loads the file (a lazy flag) and raises its error
    return fv


def test_main_commands_parse():
    mains = [(p, args) for p, m, args, _ in KINDS["module"] if m == "ddep_jax.main"]
    assert len(mains) >= 10
    errors = []
    for page, args in mains:
        try:
            fv = _parse_main(args)
            assert fv.config is not None and fv.workdir, "needs --config and --workdir"
        except Exception as e:  # noqa: BLE001 - every failure is reported
            errors.append(f"{page}: {' '.join(args)}\n  {type(e).__name__}: {e}")
    assert not errors, "\n".join(errors)


# A child process that runs each absl entry point's __main__ up to app.run
# and reports the flags it defined (names, booleans, enum values).
_FLAG_PROBE = r"""
import json, runpy, sys
from absl import app, flags
class Stop(Exception):
    pass
def fake_run(*a, **k):
    raise Stop()
app.run = fake_run
out = {}
for target in sys.argv[1:]:
    before = set(flags.FLAGS)
    try:
        if target.endswith('.py'):
            runpy.run_path(target, run_name='__main__')
        else:
            runpy.run_module(target, run_name='__main__', alter_sys=True)
    except Stop:
        pass
    new = {}
    for name in set(flags.FLAGS) - before:
        f = flags.FLAGS[name]
        new[name] = {'boolean': f.boolean,
                     'enum': list(getattr(f.parser, 'enum_values', None) or []) or None}
        delattr(flags.FLAGS, name)
    out[target] = new
print('FLAGS_JSON' + json.dumps(out))
"""

# Flags every absl program accepts.
_ABSL_COMMON = {"helpfull", "help", "helpshort", "only_check_args", "flagfile", "logtostderr",
                "alsologtostderr", "v", "verbosity"}


@pytest.fixture(scope="module")
def absl_flags():
    targets = sorted({m for _, m, _, _ in KINDS["module"]
                      if m not in ("ddep_jax.main", "ddep_jax.experiments.label_efficiency")}
                     | {s for _, s, _, _ in KINDS["script"] if s.startswith("benchmarks/")})
    proc = subprocess.run([sys.executable, "-c", _FLAG_PROBE, *targets], cwd=REPO,
                          capture_output=True, text=True, timeout=240,
                          env=subprocess_env(JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FLAGS_JSON"))
    found = json.loads(line[len("FLAGS_JSON"):])
    assert all(found[t] for t in targets), {t: len(found[t]) for t in targets}
    return found


def _check_flags(label, args, defined, errors):
    for name, value in flag_items(args):
        if name in _ABSL_COMMON:
            continue
        base = name[2:] if name.startswith("no") and name[2:] in defined else name
        spec = defined.get(base)
        if spec is None:
            errors.append(f"{label}: unknown flag --{name}")
        elif spec["enum"] and value is not None and value not in spec["enum"]:
            errors.append(f"{label}: --{name}={value} not in {spec['enum']}")
        elif value is None and not spec["boolean"] and base == name:
            errors.append(f"{label}: --{name} needs a value")


def test_other_entry_points_and_scripts_parse(absl_flags):
    from ddep_jax.config_lib import load_config_file

    errors = []
    for page, module, args, _ in KINDS["module"]:
        if module in ("ddep_jax.main", "ddep_jax.experiments.label_efficiency"):
            continue
        _check_flags(f"{page}: {module}", args, absl_flags[module], errors)
        for name, value in flag_items(args):
            if name == "config":  # vit_import's config file flag
                load_config_file(str(REPO / config_arg(value)[0]), config_arg(value)[1])
    for page, script, args, _ in KINDS["script"]:
        path = REPO / script
        if not path.is_file():
            errors.append(f"{page}: {script} does not exist")
        elif script.startswith("benchmarks/"):
            _check_flags(f"{page}: {script}", args, absl_flags[script], errors)
        else:  # argparse scripts (examples/): the options they add
            options = set(re.findall(r"add_argument\(\s*\"--([\w-]+)\"", path.read_text()))
            errors += [f"{page}: {script} has no --{n}" for n, _ in flag_items(args)
                       if n not in options | {"help"}]
    assert not errors, "\n".join(errors)


def test_label_efficiency_commands_run(tmp_path):
    from ddep_jax.experiments import label_efficiency

    runs = {}
    for page, module, args, _ in KINDS["module"]:
        if module == "ddep_jax.experiments.label_efficiency":
            runs.setdefault(tuple(a for a in args if not a.startswith(("--out", "--jobs"))),
                            (page, args))
    assert any("--recipe=camvid_cpu" in key and "--list" in key for key in runs)
    for i, (page, args) in enumerate(runs.values()):
        out = tmp_path / f"out{i}"
        argv = [a for a in args if not a.startswith("--out")] + [f"--out={out}"]
        if "--summary_only" in argv:
            recipe = next(a.split("=", 1)[1] for a in argv if a.startswith("--recipe="))
            out.mkdir()
            for f in (REPO / "results" / recipe).glob("*.jsonl"):
                shutil.copy(f, out)
        elif "--list" not in argv:
            argv.append("--list")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = label_efficiency.main(argv)
        assert rc in (0, None), f"{page}: {' '.join(argv)} -> {rc}\n{stdout.getvalue()[-2000:]}"
        if "--list" in argv:
            assert "left:" in stdout.getvalue(), stdout.getvalue()[-2000:]
        else:
            assert (out / "summary.md").is_file()


def test_launch_commands_dry_run(tmp_path):
    from ddep_jax.config_lib import apply_overrides, load_config_file

    downloads = tmp_path / "downloads"
    for d in ("cifar10", "camvid"):
        (downloads / d).mkdir(parents=True)
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("gpu-node-0\ngpu-node-1\n")
    errors, ran = [], 0
    for page, argv, env, assigned in KINDS["launch"]:
        script = REPO / argv[0]
        if not script.is_file():
            errors.append(f"{page}: {argv[0]} does not exist")
            continue
        # Every config a launch passes on loads, with its overrides' keys.
        for name, value in flag_items(argv[1:]):
            if name == "config":
                config = load_config_file(str(REPO / config_arg(value)[0]), config_arg(value)[1])
                overrides = {n[len("config."):]: v for n, v in flag_items(argv[1:])
                             if n.startswith("config.")}
                apply_overrides(config, overrides)
        args = [f"--hosts={hosts}" if a == "--hosts=hosts.txt" else a for a in argv[1:]]
        if argv[0] == "launch/chain_cpu.sh" and "--dry_run" not in args:
            args.append("--dry_run")
        run_env = {**subprocess_env(), **env, "DRY_RUN": "1", "SHARED_DATA": str(downloads),
                   "TMPDIR": str(tmp_path)}
        proc = subprocess.run(["bash", str(script), *args], cwd=REPO, env=run_env,
                              capture_output=True, text=True, timeout=60)
        ran += 1
        if proc.returncode != 0:
            errors.append(f"{page}: {' '.join(argv)} -> {proc.returncode}\n"
                          f"{proc.stderr[-1500:]}")
    assert ran >= 10
    assert not errors, "\n".join(errors)


def test_configs_named_anywhere_load():
    """Every `--config=configs/...` of every command (sbatch lines too) loads
    with its arguments."""
    from ddep_jax.config_lib import load_config_file

    errors, seen = [], set()
    for page, argv, env, _ in DOC_COMMANDS:
        for name, value in flag_items([expand(a, env) for a in argv]):
            if name == "config" and value.startswith("configs/") and value not in seen:
                seen.add(value)
                try:
                    load_config_file(str(REPO / config_arg(value)[0]), config_arg(value)[1])
                except Exception as e:  # noqa: BLE001
                    errors.append(f"{page}: --config={value}: {type(e).__name__}: {e}")
    assert len(seen) >= 10
    assert not errors, "\n".join(errors)
