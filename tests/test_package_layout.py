"""The package's shape: no import cycle between its modules (module-level imports), sharding a leaf, and
`import mixtral_jax` light (no torch, no transformers)."""
import ast
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mixtral_jax")


def _modules() -> dict:
  """module name -> path of every module of the package."""
  out = {}
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
  return out


def _imports(path: str, modules: dict, anywhere: bool = False) -> set:
  """Package modules imported at module level (or `anywhere`, function bodies included)."""
  found = set()
  tree = ast.parse(open(path).read())
  for node in (ast.walk(tree) if anywhere else tree.body):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name.startswith("mixtral_jax"):
        found.add(name)
  return found


def test_no_import_cycle():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  state = {}

  def visit(m, stack):
    state[m] = "open"
    for n in sorted(graph[m]):
      if n == "mixtral_jax":  # the package __init__ re-exports; importing it from a module is fine
        continue
      if state.get(n) == "open":
        cycle = stack[stack.index(n):] + [n]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if n not in state:
        visit(n, stack + [n])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_sharding_is_a_leaf():
  modules = _modules()
  name = next(m for m in modules if m.endswith(".sharding") or m == "mixtral_jax.parallel.sharding")
  assert _imports(modules[name], modules) <= {"mixtral_jax.config"}, "sharding imports no model code"


def test_import_is_light():
  code = "import sys, mixtral_jax; print(any(m in sys.modules for m in ('torch', 'transformers')))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "False"
