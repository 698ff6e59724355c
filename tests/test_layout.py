"""The package's layout: no import circle among ddep_jax's modules, lazy
(function-level) imports included, so that each module can be read and
tested from the ones it imports."""

import ast
import pathlib

from conftest import REPO


def _import_graph() -> dict[str, set[str]]:
    root = REPO / "ddep_jax"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in modules]
                if len(targets) < len(subs):  # names from the module itself
                    targets.append(node.module)
            else:
                continue
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    graph = _import_graph()
    assert "ddep_jax.experiments.protocols" in graph  # the walk found the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _package_of(module: str, packages: set[str]) -> str:
    """`ddep_jax.data.builders.camvid` -> `ddep_jax.data`; a module of the
    package root (`ddep_jax.main`) is a node of its own."""
    parts = module.split(".")
    top = ".".join(parts[:2])
    return top if top in packages else module


def _package_graph() -> dict[str, set[str]]:
    graph = _import_graph()
    packages = {m for m in graph if m.count(".") == 1
                and (REPO / m.replace(".", "/") / "__init__.py").exists()}
    nodes: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module == "ddep_jax":
            continue
        src = _package_of(module, packages)
        nodes.setdefault(src, set())
        nodes[src] |= {_package_of(t, packages) for t in targets if t != "ddep_jax"} - {src}
    for targets in list(nodes.values()):
        for t in targets:
            nodes.setdefault(t, set())
    return nodes


def test_packages_import_only_downward():
    """The subpackages (data, models, objectives, training, trainers,
    checkpoints, parallel, common, ...) form layers: no package imports one
    that imports it back, through any of their modules."""
    graph = _package_graph()
    assert {"ddep_jax.common", "ddep_jax.checkpoints", "ddep_jax.parallel",
            "ddep_jax.training", "ddep_jax.trainers"} <= set(graph)
    assert _cycles(graph) == []
    assert graph["ddep_jax.common"] == set()  # the leaves import nothing of ddep_jax


def test_the_package_root_holds_entry_points_and_configs_only():
    """The root keeps what users call (`python -m ddep_jax.main`, evaluate,
    predict, export; the Python API) and the config machinery (config_lib,
    defaults, recipes: what configs/ import); every library
    module lives in the package of its role."""
    root = sorted(p.stem for p in (REPO / "ddep_jax").glob("*.py"))
    assert root == ["__init__", "api", "config_lib", "defaults", "evaluate", "export",
                    "main", "predict", "recipes"]


def test_configs_import_nothing_heavy():
    """Every configs/*.py builds its default config with ml_collections and
    ddep_jax's config modules alone: no JAX, Flax, Optax, Orbax, grain or
    NumPy at import, so that --help and a bad argument answer at once."""
    import subprocess
    import sys

    script = (
        "import importlib.util, pathlib, sys\n"
        "for path in sorted(pathlib.Path('configs').glob('*.py')):\n"
        "    spec = importlib.util.spec_from_file_location(path.stem, path)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    module.get_config()\n"
        "heavy = sorted(m for m in ('jax', 'flax', 'optax', 'orbax', 'grain', 'numpy',\n"
        "                           'tensorflow') if m in sys.modules)\n"
        "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == ""


def test_the_defaults_state_the_objectives_constants():
    """`ddep_jax.defaults` states MoCo v2's crop scale and the four rotations
    literally (no JAX at import); they must equal the objectives' own."""
    from ddep_jax import defaults
    from ddep_jax.objectives import moco, rotation

    assert tuple(defaults.moco().pretext.crop_area_range) == moco.CROP_AREA
    assert defaults.rotation().model.num_outputs == rotation.NUM_ANGLES


def test_long_modules_say_why():
    """A module of ddep_jax over ~400 lines (420 with some slack) says in its
    docstring why it is one module ("Why one module")."""
    long = {}
    for path in (REPO / "ddep_jax").rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 420:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            long[str(path.relative_to(REPO))] = "Why one module" in docstring
    assert all(long.values()), {k for k, v in long.items() if not v}
