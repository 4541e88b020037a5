"""The shape of the code: every module imports, and no two modules of icr import each other,
directly or around a loop — counting imports inside functions too (a lazy import hides a cycle
from Python, not from the reader)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys

import pytest

from .conftest import REPO

SRC = REPO / "src"


def _module_name(path, src) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src=SRC) -> dict[str, set[str]]:
    """icr module -> the icr modules it imports (anywhere in the file), including the packages whose
    __init__ such an import runs."""
    files = {_module_name(p, src): p for p in (src / "icr").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)  # `from . import module`
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
                mod = ".".join(parts[:i])
                if mod in files and mod != name and not name.startswith(mod + "."):
                    edges.add(mod)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "icr"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")  # lazy imports count
    (pkg / "sub" / "b.py").write_text("from ..c import x\n")
    (pkg / "c.py").write_text("import icr.a\n")
    (pkg / "d.py").write_text("from . import c\n")
    graph = import_graph(tmp_path)
    assert graph["icr.d"] == {"icr.c"}
    assert cycles(graph) == [["icr.a", "icr.c", "icr.sub.b"]]


def test_no_import_cycles_between_icr_modules():
    graph = import_graph()
    assert {"icr.stages", "icr.workers", "icr.train_launch", "icr.plan"} <= set(graph)
    assert cycles(graph) == []


def test_every_module_imports():
    for name in sorted(import_graph()):
        importlib.import_module(name)


MAX_FUNCTION_LINES = 80


def long_functions(src=SRC) -> list[str]:
    """Functions of icr longer than MAX_FUNCTION_LINES, from `def` to their last line."""
    out = []
    for path in sorted((src / "icr").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(src)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_over_80_lines():
    assert long_functions() == []


# The lazy-import rule (src/icr/__init__.py): the command line answers without the heavy packages.
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm", "numpy")


def _imported_packages(*args: str) -> set[str]:
    """Top-level names of every module `python -X importtime ARGS` imported (its report on stderr)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in proc.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [["-c", "import icr.cli; icr.cli.build_parser()"], ["-m", "icr.cli", "--help"]],
                         ids=["build_parser", "help"])
def test_the_command_line_loads_no_heavy_package(args):
    loaded = _imported_packages(*args)
    assert {"icr", "argparse"} <= loaded  # the report is read right
    assert sorted(loaded & set(HEAVY)) == []


def process_starters(src=SRC) -> list[str]:
    """Modules of icr other than the launcher that could start a process themselves."""
    out = []
    for path in sorted((src / "icr").rglob("*.py")):
        if path.name == "launch.py" and path.parent.name == "icr":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("subprocess", "multiprocessing") for n in names) or (
                    isinstance(node, ast.Attribute) and node.attr in ("system", "popen", "execv", "spawnv")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"):
                out.append(f"{path.relative_to(src)}:{node.lineno}")
    return out


def test_every_child_process_is_started_by_the_launcher(tmp_path):
    """One launcher (icr.launch): shard workers, isolated stages and accelerate training all go
    through it, so a second backend (Ray) replaces one module."""
    assert process_starters() == []
    (tmp_path / "icr").mkdir()
    (tmp_path / "icr" / "x.py").write_text("def f():\n    import subprocess\n    os.system('ls')\n")
    assert process_starters(tmp_path) == ["icr/x.py:2", "icr/x.py:3"]


def test_make_setup_installs_the_tested_versions():
    """`make setup` installs every dependency (core and dev extra; torch is pinned by the Makefile) at
    the version of constraints.txt, the environment the suite last passed in, not the newest a
    resolver finds that day (a fresh clone elsewhere got accelerate 1.16 where the docs said 1.15)."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in wanted} - {"torch"}
    pinned = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and "@" not in line, f"constraints.txt: not a name==version pin: {line}"
            pinned[name.lower().replace("_", "-")] = version
    assert names <= set(pinned), f"constraints.txt lacks {sorted(names - set(pinned))}"
    assert "torch" not in pinned  # the Makefile's TORCH_SPEC picks the build (CPU here)
    makefile = (REPO / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "-e " in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
