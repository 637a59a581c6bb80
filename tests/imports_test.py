"""The import graph of capsjax: no cycles, and Orbax behind one module.

Every `import`/`from ... import` statement in capsjax/ counts, including those inside
functions: a function-level import that closes a cycle still couples the two modules.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "capsjax")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        out[_module_name(path)] = path
  return out


def _imports(path: str, modules: set[str]) -> set[str]:
  """The capsjax modules a file imports (`from capsjax.x import y` counts y if a module)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    else:
      continue
    for name in names:
      if name in modules:
        found.add(name)
  return found


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  # A package's __init__ importing its own submodules is not a cycle with them.
  return {
    m: {d for d in _imports(p, set(modules)) if d != m and not d.startswith(m + ".")}
    for m, p in modules.items()
  }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done.
  path: list[str] = []

  def visit(m):
    state[m] = 1
    path.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        return path[path.index(d) :] + [d]
      if d not in state:
        cycle = visit(d)
        if cycle:
          return cycle
    path.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      cycle = visit(m)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_function_level_imports():
  graph = import_graph()
  # capsjax.main imports the driver inside functions (flags parse before JAX starts).
  assert "capsjax.train" in graph["capsjax.main"]
  assert "capsjax.evaluate" in graph["capsjax.main"]


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", ["capsjax.models", "capsjax.layers", "capsjax.routing"])
def test_research_core_does_not_import_run_plumbing(package):
  graph = import_graph()
  for m, deps in graph.items():
    if m == package or m.startswith(package + "."):
      assert not {d for d in deps if d.startswith("capsjax.run")}, (m, deps)


def test_only_the_checkpoint_module_imports_orbax():
  importers = set()
  for m, path in _modules().items():
    for node in ast.walk(ast.parse(open(path).read(), path)):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module]
      if any(n == "orbax" or n.startswith("orbax.") for n in names):
        importers.add(m)
  assert importers == {"capsjax.run.checkpoint"}
