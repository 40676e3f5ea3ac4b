"""The package structure the README's Architecture section describes, enforced.

Read statically (ast), so nothing is imported: every import of every module in ``mlxtune/`` and
``backends/``, including those inside functions (they hide cycles), except ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A core package may import its own modules and packages of a lower rank, never a higher or equal one.
RANKS = {
    "errors": 0,
    "units": 1, "files": 1,
    "recipe": 2,
    "models": 3,
    "adapters": 4, "data": 4,
    "planning": 5,
    "evaluation": 6,
    "runs": 7,
    "training": 8, "export": 8,
    "system": 9,
    "cli": 10,
}
# Optional ML libraries: the core imports them inside the functions that need them only, so
# `mlxtune --help`, `validate` and `plan` run on a machine without them.
FRAMEWORKS = {"torch", "mlx", "mlx_lm", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
              "safetensors", "tokenizers", "huggingface_hub", "gguf", "sacrebleu", "matplotlib", "cefrpy", "trl"}
COMMAND_LIBS = {"click", "rich"}
BACKEND_ENTRY = "mlxtune.training.session"  # the one core module that calls backends.load_backend
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (a submodule when `from pkg import submodule`)
    line: int
    top_level: bool  # executed at import time (not inside a function)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, root: Path, known: set[str]) -> list[Import]:
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(name, a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    found.append(Import(name, sub if sub in known else base, child.lineno, top))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return list(dict.fromkeys(found))  # `from x import a, b` is one import of x


def project(root: Path, packages: tuple[str, ...]) -> dict[str, tuple[Path, list[Import]]]:
    files = [p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))]
    known = {module_name(p, root) for p in files}
    return {module_name(p, root): (p, imports_of(p, root, known)) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def import_graph(mods: dict[str, tuple[Path, list[Import]]]) -> dict[str, set[str]]:
    """Module -> project modules it imports at run time (a package's __init__ counts as a module)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, (_, imps) in mods.items():
        for imp in imps:
            target = imp.target
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != m:
                graph[m].add(target)
    return graph


def _package(module: str) -> str | None:
    """The core package a module belongs to (``python -m mlxtune`` is the command layer)."""
    parts = module.split(".")
    if parts[0] != "mlxtune" or len(parts) == 1:
        return None
    return "cli" if parts[1] == "__main__" else parts[1]


def direction_violations(mods: dict[str, tuple[Path, list[Import]]]) -> list[str]:
    bad = []
    for m, (path, imps) in mods.items():
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
        in_core, in_cli = m.startswith("mlxtune"), m.startswith(("mlxtune.cli", "mlxtune.__main__"))
        family = "torch" if ".torch_" in m else "mlx" if (".mlx_" in m or ".apple_mlx" in m) else None
        for imp in imps:
            top_pkg = imp.target.split(".")[0]
            at = f"{where}:{imp.line} imports {imp.target}"
            if top_pkg in COMMAND_LIBS and not in_cli:
                bad.append(f"{at}: only mlxtune/cli/ imports click and rich")
            if in_core and top_pkg in FRAMEWORKS and imp.top_level:
                bad.append(f"{at} at module level: import frameworks inside the function that needs them")
            if in_core and top_pkg == "backends" and not (m == BACKEND_ENTRY and imp.target == "backends"):
                bad.append(f"{at}: the core reaches a backend only through backends.load_backend in {BACKEND_ENTRY}")
            if m == "backends" and imp.target.startswith("backends.") and imp.top_level:
                bad.append(f"{at}: backends/__init__.py loads a backend only when asked (load_backend)")
            if family and imp.target.startswith("backends."):
                other = "torch" if ".torch_" in imp.target else "mlx" if (".mlx_" in imp.target or ".apple_mlx" in imp.target) else None
                if other and other != family:
                    bad.append(f"{at}: a backend never imports another backend")
            if m.startswith("backends") and imp.target.startswith("mlxtune.cli"):
                bad.append(f"{at}: backends do not use the command layer")
            src, dst = _package(m), _package(imp.target)
            if src and dst and src != dst and RANKS[dst] >= RANKS[src]:
                bad.append(f"{at}: mlxtune.{src} (rank {RANKS[src]}) may import only packages of a lower rank "
                           f"(mlxtune.{dst} has rank {RANKS[dst]}); see README, Architecture")
    return bad


@pytest.fixture(scope="module")
def mods() -> dict[str, tuple[Path, list[Import]]]:
    return project(ROOT, ("mlxtune", "backends"))


def test_every_core_package_has_a_rank(mods):
    packages = {_package(m) for m in mods if m.startswith("mlxtune.")}
    assert packages <= set(RANKS), f"add {sorted(packages - set(RANKS))} to RANKS here and to the README's Architecture section"


def test_every_folder_of_modules_is_a_package(mods):
    """setuptools' find_packages ships only folders with an __init__.py: without one, an editable
    install works and the wheel silently leaves the folder out."""
    folders = {path.parent for path, _ in mods.values()}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()) == []


def test_no_import_cycles(mods):
    assert cycles(import_graph(mods)) == []


def test_imports_follow_the_allowed_directions(mods):
    assert direction_violations(mods) == []


def test_modules_and_functions_stay_small(mods):
    big = []
    for path, _ in mods.values():
        text = path.read_text(encoding="utf-8")
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(ROOT)}: {n} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines (at most {MAX_FUNCTION_LINES})")
    assert big == []


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_checks_catch_a_cycle_hidden_in_a_function_and_an_upward_import(tmp_path):
    """The checker on a small tree that breaks each rule once (so the tests above can fail)."""
    _write(tmp_path, {
        "mlxtune/__init__.py": "",
        "mlxtune/data/__init__.py": "",
        "mlxtune/data/records.py": "from mlxtune.recipe.schema import Recipe\n",
        "mlxtune/recipe/__init__.py": "",
        "mlxtune/recipe/schema.py": "def f():\n    from mlxtune.data import records\n",
        "mlxtune/training/__init__.py": "",
        "mlxtune/training/loop.py": "import torch\nimport rich\nfrom backends import apple_mlx\n",
        "backends/__init__.py": "",
        "backends/apple_mlx.py": "from . import torch_peft\n",
        "backends/torch_peft.py": "",
    })
    found = project(tmp_path, ("mlxtune", "backends"))
    assert cycles(import_graph(found)) == [["mlxtune.data.records", "mlxtune.recipe.schema"]]
    problems = "\n".join(direction_violations(found))
    for expected in ("mlxtune.recipe (rank 2) may import only packages of a lower rank",
                     "at module level: import frameworks inside",
                     "only mlxtune/cli/ imports click and rich",
                     "the core reaches a backend only through backends.load_backend",
                     "a backend never imports another backend"):
        assert expected in problems


BLOCK_FRAMEWORKS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
from click.testing import CliRunner
from mlxtune.cli.main import cli
for args in {commands!r}:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and result.exception is None, (args, result.output, result.exception)
print("ok")
"""


def test_help_validate_plan_and_keys_run_without_any_framework():
    """What the static check promises, run: these commands import no ML framework."""
    import subprocess
    import sys

    commands = [["--help"], ["validate", "recipes/quickstart.toml", "--backend", "mlx"],
                ["plan", "recipes/en_tr_qlora.toml", "--backend", "mlx"], ["keys", "--markdown"]]
    code = BLOCK_FRAMEWORKS.format(blocked=sorted(FRAMEWORKS), commands=commands)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
