"""What the source tree imports, read from the AST (nothing is executed).

Every `import x`, `from x import y` (relative ones resolved), function-local imports included, and
`importlib.import_module("x")` / `__import__("x")` with a literal argument. Registry strings that name a
module ("pkg.mod" or "pkg.mod:Attr", the way the CLI verbs and the backends are registered) are kept
separately: they are resolved only when used, so they are no import edge, but they still say which
side of the tree a file reaches into.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("sdk", "runtimes", "export")

IMPORT_CALLS = {"import_module", "__import__"}
# "a.b", "a.b.c", "a.b:Attr": a dotted module path, optionally with the attribute a registry resolves.
MODULE_STRING = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?$")


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # absolute dotted name
    names: tuple[str, ...] = ()  # `from module import names`; () for `import module` and calls
    kind: str = "import"  # import | from | call | string
    owner: str = ""  # for strings: the name assigned to (e.g. "VERBS"), "" at no assignment

    def where(self, root: Path = ROOT) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(root: Path = ROOT, packages=SOURCE_PACKAGES) -> list[Path]:
    return sorted(p for package in packages for p in (root / package).rglob("*.py"))


def resolve_relative(path: Path, module: str | None, level: int, root: Path = ROOT) -> str:
    """`from ..x import y` in path -> the absolute name of `..x`.

    Dots beyond the top-level package (an ImportError when run) are read as reaching the tree's root, so
    `from ...export import writer` in sdk/sub/ still names export and is caught by the boundary scan."""
    if level == 0:
        return module or ""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: max(len(package) - (level - 1), 0)]
    return ".".join(base + ([module] if module else []))


class _Visitor(ast.NodeVisitor):
    def __init__(self, path: Path, root: Path):
        self.path, self.root, self.found, self.owner = path, root, [], ""

    def visit_Import(self, node):
        self.found += [Import(self.path, node.lineno, alias.name) for alias in node.names]

    def visit_ImportFrom(self, node):
        module = resolve_relative(self.path, node.module, node.level, self.root)
        names = tuple(a.name for a in node.names)
        if module:
            self.found.append(Import(self.path, node.lineno, module, names, "from"))
        else:  # `from ... import export`: each name is a top-level module
            self.found += [Import(self.path, node.lineno, name, kind="from") for name in names]

    def visit_Call(self, node):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in IMPORT_CALLS and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self.found.append(Import(self.path, node.lineno, node.args[0].value, kind="call"))
            for child in [node.func, *node.args[1:], *node.keywords]:
                self.visit(child)
            return
        self.generic_visit(node)

    def _visit_assignment(self, node, targets):
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        outer, self.owner = self.owner, names[0] if names else self.owner
        self.generic_visit(node)
        self.owner = outer

    def visit_Assign(self, node):
        self._visit_assignment(node, node.targets)

    def visit_AnnAssign(self, node):
        self._visit_assignment(node, [node.target])

    def visit_Constant(self, node):
        if isinstance(node.value, str) and MODULE_STRING.match(node.value):
            module = node.value.split(":")[0]
            self.found.append(Import(self.path, node.lineno, module, kind="string", owner=self.owner))


def imports(path: Path, root: Path = ROOT) -> list[Import]:
    visitor = _Visitor(path, root)
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor.found


def top_level(module: str) -> str:
    return module.split(".")[0]


def import_graph(files: list[Path], root: Path = ROOT) -> dict[str, dict[str, Import]]:
    """module -> {imported module in the tree -> the first import that makes the edge}.

    `from pkg import name` points at pkg.name when that is a module of the tree, else at pkg.
    Registry strings make no edge (they are resolved on use)."""
    known = {module_name(p, root) for p in files}
    graph: dict[str, dict[str, Import]] = {module_name(p, root): {} for p in files}
    for path in files:
        source = module_name(path, root)
        for imp in imports(path, root):
            if imp.kind == "string":
                continue
            targets = [f"{imp.module}.{n}" if f"{imp.module}.{n}" in known else imp.module for n in imp.names] \
                or [imp.module]
            for target in targets:
                if target in known and target != source:
                    graph[source].setdefault(target, imp)
    return graph


def find_cycle(graph: dict[str, dict[str, Import]]) -> list[str] | None:
    """The first cycle found, as a path [a, b, ..., a]; None when the graph is acyclic."""
    state: dict[str, str] = {}  # visiting | done

    def visit(node, stack):
        state[node] = "visiting"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "visiting":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def private_imports(files: list[Path], root: Path = ROOT) -> list[Import]:
    """`from m import _x` (and `import m._x`) where m is another module: a private name crossing a file."""
    found = []
    for path in files:
        for imp in imports(path, root):
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            private_module = any(p.startswith("_") and not p.startswith("__") for p in imp.module.split("."))
            if imp.kind != "string" and (private or private_module):
                found.append(imp)
    return found
