"""The package's import graph has no cycles, and every module imports in a fresh interpreter.

The graph counts every `import` of an `arvision` module, at module level and inside functions (a
deferred import is still a dependency: `evaluator -> train -> evaluator` was a cycle although one
side imported late), except under `if TYPE_CHECKING:`. A package's `__init__` counts as a module.
With no cycle the order in which modules get imported never matters.
"""

from __future__ import annotations

import ast
import concurrent.futures
import graphlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "arvision"


def package_modules(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
  """Dotted module name -> file, for every `.py` under `root/package` (packages by `__init__`)."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
    for name in filenames:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        dotted = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
        out[dotted.removesuffix(".__init__")] = path
  return out


def _is_type_checking(node: ast.If) -> bool:
  t = node.test
  return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
    isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
  )


def _import_nodes(tree: ast.AST):
  """Every Import/ImportFrom in `tree`, skipping `if TYPE_CHECKING:` bodies."""
  stack = [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    children = list(ast.iter_child_nodes(node))
    if isinstance(node, ast.If) and _is_type_checking(node):
      children = node.orelse
    stack.extend(children)


def _targets(node, module: str, is_package: bool, modules: dict) -> set[str]:
  """The package modules that one import statement in `module` loads by name."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  else:
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
      pkg = module if is_package else module.rpartition(".")[0]
      for _ in range(node.level - 1):
        pkg = pkg.rpartition(".")[0]
      base = f"{pkg}.{base}" if base else pkg
    # `from a import b` loads a.b when b is a submodule, else a (b is a name defined in a).
    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
  out = set()
  for name in names:
    while name and name not in modules:  # `import a.b.c` of a name inside a.b -> a.b
      name = name.rpartition(".")[0]
    if name and name != module:
      out.add(name)
  return out


def import_graph(root: str = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
  """Module -> the package modules it imports (anywhere in the file)."""
  modules = package_modules(root, package)
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), filename=path)
    is_package = path.endswith("__init__.py")
    graph[module] = set().union(
      *(_targets(n, module, is_package, modules) for n in _import_nodes(tree))
    )
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle (`[a, b, ..., a]`), or None when the graph is acyclic."""
  try:
    graphlib.TopologicalSorter(graph).prepare()
  except graphlib.CycleError as e:
    return list(e.args[1])
  return None


def test_the_graph_sees_deferred_relative_and_package_imports(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("from pkg import a\n")
  (pkg / "a.py").write_text(
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from pkg import b\n"
    "def f():\n  from .sub import c\n"
  )
  (pkg / "b.py").write_text("import pkg.a\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "c.py").write_text("from ..b import thing\nfrom pkg.sub import c as self_ref\n")
  graph = import_graph(str(tmp_path), "pkg")
  assert graph == {
    "pkg": {"pkg.a"},
    "pkg.a": {"pkg.sub.c"},  # deferred and relative; the TYPE_CHECKING import is not counted
    "pkg.b": {"pkg.a"},
    "pkg.sub": set(),
    "pkg.sub.c": {"pkg.b"},
  }
  assert find_cycle(graph) is not None  # a -> sub.c -> b -> a
  graph["pkg.b"] = set()
  assert find_cycle(graph) is None


def test_package_has_no_import_cycles():
  graph = import_graph()
  assert len(graph) > 50 and "arvision.evaluation.evaluate" in graph  # the walk found the package
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _import_in_fresh_interpreter(module: str) -> tuple[str, int, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", f"import {module}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  return module, proc.returncode, proc.stderr[-1500:]


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
  modules = sorted(package_modules())
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
    results = list(pool.map(_import_in_fresh_interpreter, modules))
  failed = {m: err for m, rc, err in results if rc != 0}
  assert not failed, "\n\n".join(f"{m}:\n{err}" for m, err in failed.items())
