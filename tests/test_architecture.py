"""The plan of the house, checked: which package may import which (see raugment/ARCHITECTURE.md).

Every ``import`` of a ``raugment`` module anywhere in a module counts (at the top, inside a function
or under ``TYPE_CHECKING``): a lazy import couples two packages as much as an eager one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO

PACKAGE = REPO / "raugment"
HEAVY = ("torch", "torchvision", "ray", "diffusers", "transformers", "open_clip", "faiss", "timm")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            # ``from pkg import module``: the submodule is imported too
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the raugment modules it imports (names that are not modules are dropped)."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = {m for m in imports_of(path, name) if m in files and m != name}
    return graph


def external_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> top-level names of the non-raugment packages it imports."""
    out = {}
    for path in package.rglob("*.py"):
        name = module_name(path, package)
        out[name] = {m.split(".")[0] for m in imports_of(path, name) if not m.startswith("raugment")}
    return out


def layer(module: str) -> str:
    """``core``, ``runtime``, ``models``, ``lib``, ``stages.<stage>``, ``study``, ``demo``, ``config``,
    ``cli`` or ``raugment`` (the package itself)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "raugment"
    if parts[1] == "stages" and len(parts) > 2:
        return f"stages.{parts[2]}"
    return parts[1]


# layer -> the layers it may import (besides itself)
ALLOWED = {
    "raugment": set(),
    "core": set(),
    "runtime": {"core"},
    "models": {"core", "runtime"},
    "lib": {"core", "runtime", "models"},
    "study": {"core", "runtime", "models", "lib", "config", "stages.*"},
    "demo": {"core", "runtime", "models", "lib", "config", "stages.*", "study"},
    "cli": {"*"},
}
STAGE_MAY_IMPORT = {"core", "runtime", "models", "lib", "config"}


def allowed(src: str, dst: str) -> bool:
    a, b = layer(src), layer(dst)
    if a == b or b == "raugment":
        return True
    if a == "config":  # the list of sections: every section's config module, nothing else
        return b == "core" or dst.endswith(".config")
    if a.startswith("stages."):
        return b in STAGE_MAY_IMPORT
    rules = ALLOWED[a]
    return "*" in rules or b in rules or (b.startswith("stages.") and "stages.*" in rules)


def violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, dsts in graph.items() for dst in dsts
                  if not allowed(src, dst))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# ---- the rules, on the package -----------------------------------------------------------------

GRAPH = import_graph()


def test_layers_import_only_what_they_may():
    assert violations(GRAPH) == []


def test_stage_packages_never_import_each_other():
    crossing = sorted(f"{s} imports {d}" for s, ds in GRAPH.items() for d in ds
                      if layer(s).startswith("stages.") and layer(d).startswith("stages.") and layer(s) != layer(d))
    assert crossing == []


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_core_imports_no_stage_no_ray_no_torch():
    core = [m for m in GRAPH if layer(m) == "core"]
    assert core, "no core package found"
    assert {(m, d) for m in core for d in GRAPH[m] if layer(d) != "core"} == set()
    heavy = {m: sorted(set(HEAVY) & ext) for m, ext in external_imports().items() if layer(m) == "core"}
    assert {m: h for m, h in heavy.items() if h} == {}


def test_runtime_and_models_know_no_stage():
    assert [f"{s} imports {d}" for s, ds in GRAPH.items() for d in ds
            if layer(s) in ("runtime", "models", "lib")
            and (layer(d).startswith("stages.") or layer(d) == "study")] == []


def test_demo_is_imported_only_by_the_cli():
    # the section list imports the demo's config dataclass (section ``mini``), nothing else of it
    users = sorted((s, d) for s, ds in GRAPH.items() for d in ds if layer(d) == "demo" and layer(s) != "demo")
    allowed = ("raugment.config", "raugment.demo.config")
    assert [(s, d) for s, d in users if s != "raugment.cli" and (s, d) != allowed] == []


def test_loading_a_config_imports_neither_torch_nor_ray():
    code = ("import sys; from raugment.config import load_config; "
            "load_config('jobs/configs/imagenet10.yaml'); from raugment import cli; cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'diffusers', 'faiss'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- the checker itself: it sees a crossing, a cycle and a heavy import ---------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "raugment"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return root


def test_the_checker_sees_a_stage_importing_another(tmp_path):
    root = _tree(tmp_path, {"stages/audit/stage.py": "def run():\n    from raugment.stages.dedup import stage\n",
                            "stages/dedup/stage.py": "from raugment.core import schema\n",
                            "core/schema.py": ""})
    assert violations(import_graph(root)) == ["raugment.stages.audit.stage imports raugment.stages.dedup",
                                              "raugment.stages.audit.stage imports raugment.stages.dedup.stage"]


def test_the_checker_sees_a_cycle_and_core_reaching_up(tmp_path):
    root = _tree(tmp_path, {"core/a.py": "from raugment.core import b\n",
                            "core/b.py": "from raugment.core.a import x\nfrom raugment.lib import c\n",
                            "lib/c.py": ""})
    graph = import_graph(root)
    assert cycles(graph) == [["raugment.core.a", "raugment.core.b"]]
    assert "raugment.core.b imports raugment.lib.c" in violations(graph)


@pytest.mark.parametrize("module, dst, ok", [
    ("raugment.stages.filter.stage", "raugment.lib.hashing", True),
    ("raugment.stages.filter.stage", "raugment.stages.dedup.stage", False),
    ("raugment.stages.filter.stage", "raugment.study.planner", False),
    ("raugment.study.planner", "raugment.stages.finetune.methods", True),
    ("raugment.lib.loader", "raugment.stages.train.stage", False),
    ("raugment.runtime.cluster", "raugment.models.clip", False),
    ("raugment.demo.command", "raugment.study.executor", True),
    ("raugment.study.executor", "raugment.demo.command", False),
])
def test_the_rules(module, dst, ok):
    assert allowed(module, dst) is ok
