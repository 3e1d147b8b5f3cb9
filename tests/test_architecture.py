"""The structure the project promises: packages in layers that import only downward, no import
circles inside the package, a family folder lists its plug-ins (shared code lives in its
``common`` sub-package), and the model code is one package whose features folder lists its
feature records."""
import ast
import importlib
import os
import pkgutil

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "megatron_ext")


def _modules():
    mods = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                mods[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return mods


def _imports(mods):
    """Module -> package modules it imports (any nesting level: a function-level import is a
    dependency too)."""
    edges = {m: set() for m in mods}
    for module, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".") if is_pkg else module.split(".")[:-1]
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges[module].add(target)
    return edges


def _cycles(edges):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


# Bottom to top. A module imports its own layer and the layers below, never one above (function-level
# imports included). A name is a module or a package (its modules too).
LAYERS = [
    ("base", ["megatron_ext.argtypes", "megatron_ext.fileio", "megatron_ext.optional", "megatron_ext.derivations",
              "megatron_ext.checkpoint_layout", "megatron_ext.registry", "megatron_ext.plotting", "megatron_ext.progress",
              "megatron_ext.platform"]),
    ("plug-in families", ["megatron_ext.schedules", "megatron_ext.optimizers", "megatron_ext.parametrizations"]),
    ("model", ["megatron_ext.models"]),
    ("data", ["megatron_ext.data"]),
    ("training", ["megatron_ext.training"]),
    ("memory plan", ["megatron_ext.planning"]),
    ("flags and plan", ["megatron_ext.arguments", "megatron_ext.flag_spelling", "megatron_ext.plan",
                        "megatron_ext.experiment_config"]),
    ("integrations", ["megatron_ext.hf", "megatron_ext.megatron_deepspeed", "megatron_ext.launcher",
                      "megatron_ext.sweeps"]),
    ("entry points", ["megatron_ext.commands", "megatron_ext.cli", "megatron_ext.train", "megatron_ext",
                      "megatron_ext.planning.measure"]),
]


def _layer_of(module: str) -> int:
    best = None
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[1]):
                best = (index, len(name))
    assert best is not None, f"{module} belongs to no layer of tests/test_architecture.py:LAYERS"
    return best[0]


def _upward(edges):
    return sorted(f"{a} ({LAYERS[_layer_of(a)][0]}) imports {b} ({LAYERS[_layer_of(b)][0]})"
                  for a, targets in edges.items() for b in targets if _layer_of(b) > _layer_of(a))


def test_every_module_imports_only_its_own_layer_and_below():
    assert _upward(_imports(_modules())) == []


def test_the_layer_check_finds_an_upward_import():
    assert _upward({"megatron_ext.optimizers.common.hooks": {"megatron_ext.training.loss"}}) == [
        "megatron_ext.optimizers.common.hooks (plug-in families) imports megatron_ext.training.loss (training)"]


def test_no_import_circles_in_the_package():
    assert _cycles(_imports(_modules())) == []


# Packages whose function-level imports are explained once, in their ``__init__`` docstring.
LAZY_PACKAGES = ("megatron_ext.commands.", "megatron_ext.megatron_deepspeed.")


def _unexplained_function_imports(module: str, source: str):
    """Package imports inside a function with no reason next to them: a comment on the import's
    line, or on the line above its block of imports (docs/architecture.md)."""
    if module.startswith(LAZY_PACKAGES):
        return []
    lines, tree = source.splitlines(), ast.parse(source)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in top or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        if not (getattr(node, "level", 0) or any(n.startswith("megatron_ext") for n in names)):
            continue
        if "#" in lines[node.end_lineno - 1]:
            continue
        above = node.lineno - 2
        while above >= 0 and lines[above].strip().startswith(("from ", "import ")) or (
                above >= 0 and not lines[above].strip()):
            above -= 1
        if above < 0 or not lines[above].strip().startswith("#"):
            found.append(f"{module}:{node.lineno}")
    return found


def test_imports_inside_functions_say_why():
    mods = _modules()
    assert [where for module, path in sorted(mods.items())
            for where in _unexplained_function_imports(module, open(path).read())] == []


def test_the_import_check_finds_an_unexplained_one():
    source = ("def f():\n    from megatron_ext.plan import build_plan\n\n"
              "def g():\n    # a reason\n    from megatron_ext.plan import parse_plan\n")
    assert _unexplained_function_imports("megatron_ext.x", source) == ["megatron_ext.x:2"]
    assert _unexplained_function_imports("megatron_ext.commands.x", source) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("family", ["optimizers", "schedules", "parametrizations"])
def test_a_family_folder_lists_its_plugins(family):
    from megatron_ext import registry

    folder = os.path.join(PACKAGE, family)
    modules = {m.name for m in pkgutil.iter_modules([folder]) if not m.ispkg}
    registered = {p.source.rsplit(".", 1)[-1] for reg in registry.families().values() for p in reg.plugins()
                  if p.source.startswith(f"megatron_ext.{family}.")}
    assert modules == registered, "every module of a family folder registers a plug-in; shared code is in common/"


# megatron-core's model building: the GPT model and its layer specs, the config, core attention
MODEL_BUILDING = ("megatron.core.models", "megatron.core.transformer.spec_utils",
                  "megatron.core.transformer.dot_product_attention", "megatron.core.transformer.transformer_config")


def test_the_model_package_holds_the_model_code():
    """Only megatron_ext/models builds the model (imports megatron-core's model building), and each
    module of models/features is one registered feature record."""
    from megatron_ext.models import features

    outside = []
    for module, path in _modules().items():
        if module == "megatron_ext.models" or module.startswith("megatron_ext.models."):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            outside += [f"{module} imports {n}" for n in names if n.startswith(MODEL_BUILDING)]
    assert outside == [], "model code lives in megatron_ext/models"
    folder = os.path.join(PACKAGE, "models", "features")
    modules = sorted(m.name for m in pkgutil.iter_modules([folder]))
    records = [importlib.import_module(f"megatron_ext.models.features.{m}").FEATURE for m in modules]
    assert set(features.FEATURES) == set(records), "every module of models/features is a registered feature"
