"""The tree's shape: no import cycle between files, no private name crossing a file, small files."""

from __future__ import annotations

from pathlib import Path

from import_graph import ROOT, find_cycle, import_graph, module_name, private_imports, source_files

LINE_LIMIT = 500
# Files allowed over the limit, with their own limit and why.
LONGER_FILES = {
    # The TensorRT backend (engine keys, profiles, building, execution): split it when it next grows;
    # today a split would only move names that tests/test_tensorrt_cpu.py reaches through one module.
    "runtimes/tensorrt.py": 560,
}


def describe_cycle(graph, cycle: list[str], root: Path = ROOT) -> str:
    steps = [f"{a} ({graph[a][b].where(root)})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def test_no_import_cycle_between_files():
    graph = import_graph(source_files())
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {describe_cycle(graph, cycle)}"


def test_no_private_name_is_imported_from_another_module():
    files = source_files(ROOT, ("sdk", "runtimes", "export", "scripts", "tests"))
    offenders = [f"{i.where()} from {i.module} import {', '.join(i.names)}" for i in private_imports(files)]
    assert offenders == []


def test_files_stay_under_the_line_limit():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in source_files()}
    offenders = {name: n for name, n in lengths.items() if n > LONGER_FILES.get(name, LINE_LIMIT)}
    assert offenders == {}, f"split these files (limit {LINE_LIMIT} lines): {offenders}"


def write_tree(root: Path, files: dict[str, str]) -> list[Path]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return sorted(root.rglob("*.py"))


def test_the_cycle_scan_follows_local_relative_and_literal_imports(tmp_path):
    files = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def later():\n    from .sub import c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import importlib\nM = importlib.import_module('pkg.a')\n",
        "pkg/d.py": "REGISTRY = {'x': 'pkg.a:thing'}\nfrom pkg.a import name\n",  # a string is no edge
    })
    graph = import_graph(files, tmp_path)
    cycle = find_cycle(graph)
    assert cycle == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert describe_cycle(graph, cycle, tmp_path) == \
        "pkg.a (pkg/a.py:1) -> pkg.b (pkg/b.py:2) -> pkg.sub.c (pkg/sub/c.py:2) -> pkg.a"
    assert set(graph["pkg.d"]) == {"pkg.a"}
    assert module_name(tmp_path / "pkg/sub/__init__.py", tmp_path) == "pkg.sub"

    (tmp_path / "pkg/sub/c.py").write_text("import importlib\n")
    assert find_cycle(import_graph(files, tmp_path)) is None


def test_the_private_name_scan_sees_names_and_modules(tmp_path):
    files = write_tree(tmp_path, {
        "pkg/__init__.py": "from .a import __version__\n",
        "pkg/a.py": "__version__ = '1'\n_helper = 1\n",
        "pkg/b.py": "def f():\n    from .a import public, _helper\n",
        "pkg/c.py": "import pkg._hidden\n",
    })
    assert [(i.where(tmp_path), i.module) for i in private_imports(files, tmp_path)] == [
        ("pkg/b.py:2", "pkg.a"), ("pkg/c.py:1", "pkg._hidden")]
