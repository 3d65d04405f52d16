"""Imports point downwards (docs/design.md, "Layers"): every import in src/rlxf — at module level or
inside a function, ``import x`` or ``from x import y``, absolute or relative, and
``importlib.import_module("rlxf....")`` with a literal name — goes to a lower layer or stays in its
own package. Also: the size limits of recipes and workflows, and the names the recipe registry
points to.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Bottom to top. Each entry is a package or module of rlxf (a unit); a module belongs to the unit
# with the longest name that contains it. An import may go to a unit of a lower layer or stay in
# its own unit; an import to another unit of the same layer or of a higher one is a violation.
LAYERS: list[tuple[str, ...]] = [
    ("rlxf", "rlxf.configs.choices", "rlxf.tasks", "rlxf.runtime", "rlxf.sandbox"),
    ("rlxf.losses", "rlxf.data", "rlxf.zoo"),
    ("rlxf.config", "rlxf.models"),
    ("rlxf.reporting", "rlxf.rollout"),
    ("rlxf.judges",),
    ("rlxf.rewards",),
    ("rlxf.envs",),
    ("rlxf.configs", "rlxf.labeling"),
    ("rlxf.train",),
    ("rlxf.recipes",),
    ("rlxf.workflows",),
    ("rlxf.serve",),
    ("rlxf.cli",),
    ("rlxf.__main__",),
]
RANK = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted((SRC / "rlxf").rglob("*.py"))
MODULES = {module_name(path) for path in SOURCES}


def unit_of(module: str) -> str | None:
    """The unit of ``module``: the longest name in LAYERS that is the module or a package above it
    (the package root ``rlxf`` counts only for itself)."""
    if module == "rlxf":
        return "rlxf"
    matches = [u for u in RANK if u != "rlxf" and (module == u or module.startswith(u + "."))]
    return max(matches, key=len) if matches else None


def imported_modules(tree: ast.AST, module: str, *, is_package: bool, modules: set[str]):
    """``(line, name)`` of every rlxf module that ``tree`` imports, anywhere in it."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield node.lineno, submodule if submodule in modules else source
        elif isinstance(node, ast.Call) and node.args and _is_import_call(node.func):
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def _is_import_call(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def violations(source: str, module: str, where: str, *, is_package: bool = False,
               modules: set[str] = MODULES) -> list[str]:
    """``where:line imports X (layer A -> layer B)`` for each import of ``source`` (module ``module``)
    that does not go downwards."""
    unit = unit_of(module)
    if unit is None:
        return [f"{where}:1 module {module} is in no layer of LAYERS"]
    found = []
    for line, target in imported_modules(ast.parse(source), module, is_package=is_package, modules=modules):
        if target != "rlxf" and not target.startswith("rlxf."):
            continue
        other = unit_of(target)
        if other == unit:
            continue
        if other is None or RANK[other] >= RANK[unit]:
            found.append(f"{where}:{line} imports {target} (layer {_short(unit)} -> layer {_short(other)})")
    return found


def _short(unit: str | None) -> str:
    return "?" if unit is None else unit.removeprefix("rlxf.")


def test_every_import_points_downwards():
    found = []
    for path in SOURCES:
        found += violations(path.read_text(encoding="utf-8"), module_name(path), str(path.relative_to(ROOT)),
                            is_package=path.name == "__init__.py")
    assert not found, "imports that do not point downwards:\n" + "\n".join(found)


def test_every_package_has_a_layer():
    assert [m for m in sorted(MODULES) if unit_of(m) is None] == []
    assert len(RANK) == sum(len(units) for units in LAYERS), "a unit is listed twice"


def test_the_required_order_of_the_layers():
    below_recipes = ("losses", "models", "data", "rollout", "rewards", "judges", "runtime", "train", "sandbox",
                     "tasks", "zoo", "reporting", "configs", "configs.choices", "config")
    for name in below_recipes:
        assert RANK[f"rlxf.{name}"] < RANK["rlxf.recipes"], name
    assert RANK["rlxf.recipes"] < RANK["rlxf.workflows"] < RANK["rlxf.cli"]
    assert RANK["rlxf.serve"] < RANK["rlxf.cli"]


@pytest.mark.parametrize("module,source,expected", [
    ("rlxf.losses.bad", "def f():\n    from rlxf.recipes.sft import train\n",
     "bad.py:2 imports rlxf.recipes.sft (layer losses -> layer recipes)"),
    ("rlxf.zoo.bad", "x = 1\nfrom ..recipes import common\n",
     "bad.py:2 imports rlxf.recipes.common (layer zoo -> layer recipes)"),
    ("rlxf.recipes.bad", "import rlxf.cli\n", "bad.py:1 imports rlxf.cli (layer recipes -> layer cli)"),
    ("rlxf.recipes.bad", "from rlxf.workflows import compare\n",
     "bad.py:1 imports rlxf.workflows.compare (layer recipes -> layer workflows)"),
    ("rlxf.workflows.bad", "def f():\n    import rlxf.cli as cli\n",
     "bad.py:2 imports rlxf.cli (layer workflows -> layer cli)"),
    ("rlxf.train.bad", "import importlib\n\ndef f():\n    return importlib.import_module('rlxf.workflows.rlaif')\n",
     "bad.py:4 imports rlxf.workflows.rlaif (layer train -> layer workflows)"),
    ("rlxf.rollout.bad", "from rlxf.reporting import Panel\n",
     "bad.py:1 imports rlxf.reporting (layer rollout -> layer reporting)"),
    ("rlxf.tasks.bad", "from rlxf.configs.registry import get_recipe\n",
     "bad.py:1 imports rlxf.configs.registry (layer tasks -> layer configs)"),
])
def test_the_checker_catches_an_import_that_goes_up(module, source, expected):
    assert violations(source, module, "bad.py", modules=MODULES | {module}) == [expected]


@pytest.mark.parametrize("module,source", [
    ("rlxf.recipes.good", "from rlxf.models import token_logps\nfrom . import common\nfrom .sft import train\n"),
    ("rlxf.workflows.good", "def f():\n    from rlxf.recipes.common import setup_logging\n"),
    ("rlxf.losses.good", "from rlxf.configs.choices import KL_KINDS\nimport torch\n"),
    ("rlxf.cli", "from rlxf.workflows.compare import run_comparison\nimport rlxf\n"),
])
def test_the_checker_accepts_imports_that_go_down(module, source):
    assert violations(source, module, "good.py", modules=MODULES | {module}) == []


def test_the_rollout_modules_share_only_public_names():
    """The engines share their host-side pieces through rlxf.rollout.sampling, by public names."""
    found = []
    for path in sorted((SRC / "rlxf" / "rollout").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlxf.rollout"):
                found += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_")]
    assert found == []


def test_recipe_and_workflow_functions_stay_short():
    """No function of rlxf.recipes or rlxf.workflows is longer than 80 lines, no workflow module
    longer than 400."""
    long_functions, long_modules = [], []
    for folder in ("recipes", "workflows"):
        for path in sorted((SRC / "rlxf" / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if folder == "workflows" and len(text.splitlines()) > 400:
                long_modules.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > 80:
                        long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert long_functions == [] and long_modules == []


def test_the_registry_names_configs_and_recipes_only():
    """The registry (a low layer) names its config classes in rlxf.configs and its train functions in
    rlxf.recipes as strings; only the command line and the workflows resolve a train function."""
    from rlxf.configs.registry import RECIPES

    for recipe in RECIPES.values():
        assert recipe.config.startswith("rlxf.configs."), recipe
        assert recipe.train.startswith("rlxf.recipes."), recipe
