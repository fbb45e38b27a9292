"""The package's import graph: no cycle, and no package module imported inside a function
(the way cycles are usually dodged). Read with `ast` from the source, nothing imported."""

import ast
import os

PACKAGE = "fedmerge_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def package_modules(root=ROOT):
  """{dotted module name: path} of every .py file under the package."""
  found = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        parts = os.path.relpath(os.path.join(folder, name), os.path.dirname(root))[:-3]
        dotted = parts.replace(os.sep, ".")
        found[dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted] = (
          os.path.join(folder, name)
        )
  return found


def imported_modules(node: ast.AST, modules) -> list:
  """The package modules an import statement names (`from a import b`: a.b where that is a
  module, else a)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in modules]
  if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
    found = []
    for alias in node.names:
      child = f"{node.module}.{alias.name}"
      found.append(child if child in modules else node.module)
    return [m for m in found if m in modules]
  return []


def import_graph(root=ROOT):
  """({module: set of modules it imports}, [(module, line, imported) inside a function])."""
  modules = package_modules(root)
  graph, in_functions = {m: set() for m in modules}, []
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    functions = [
      n
      for n in ast.walk(tree)
      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    ]
    inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
      for target in imported_modules(node, modules):
        graph[module].add(target)
        if id(node) in inside:
          in_functions.append((module, node.lineno, target))
  return graph, in_functions


def find_cycle(graph):
  """One cycle [a, b, ..., a] of `graph`, or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_package_imports_without_a_cycle():
  graph, _ = import_graph()
  assert (
    len(graph) > 40
    and "fedmerge_jax.train" in graph["fedmerge_jax.soak"] | graph["fedmerge_jax.compare"]
  )  # The graph was read at all.
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# benchmark.py is being split into a package by another change; its one function-level
# import (of a module data/__init__ imports anyway) goes with that split.
PENDING = set()  # (module, imported) pairs allowed inside a function for now: none.


def test_no_package_module_is_imported_inside_a_function():
  _, in_functions = import_graph()
  in_functions = [(m, line, t) for m, line, t in in_functions if (m, t) not in PENDING]
  assert not in_functions, "\n".join(
    f"{m}:{line} imports {t} inside a function" for m, line, t in in_functions
  )


def test_cycles_and_function_imports_are_seen(tmp_path):
  """The checks themselves: a two-module cycle closed inside a function is found twice over."""
  package = tmp_path / PACKAGE
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "a.py").write_text(f"from {PACKAGE} import b\n")
  (package / "b.py").write_text(f"def f():\n  from {PACKAGE} import a\n  return a\n")
  graph, in_functions = import_graph(str(package))
  assert find_cycle(graph) == [f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.a"]
  assert in_functions == [(f"{PACKAGE}.b", 2, f"{PACKAGE}.a")]
