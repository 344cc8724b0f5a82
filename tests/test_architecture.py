"""The mechanical rules of docs/architecture.md, checked on the source: sizes of files and
functions in rollout/ and tlt/, one code path for one device (no `mesh is None`), pure files
without a clock, host files without `jax.jit`, and imports that only run down the layer table
with no cycle."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tlt_jax"
ROOMS = ("rollout", "tlt")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
# Longer than the rule today, at most this long (the list only shrinks).
FUNCTION_EXCEPTIONS = {"rollout/speculative.py:speculative_round": 79}
PURE = ("rollout/decode.py", "rollout/speculative.py", "rollout/sampling.py", "rollout/strategy.py",
        "rollout/records.py", "tlt/groups.py")
HOST = ("rollout/session.py", "rollout/engine.py", "tlt/scheduler.py", "tlt/runtime.py", "tlt/bandit.py",
        "tlt/buffer.py", "tlt/drafter_trainer.py")
# A package may import its own layer and those below, never one above.
LAYERS = [("errors", "utils"), ("data", "parallel"), ("train",), ("models",), ("drafter",), ("rollout",),
          ("tlt",), ("rl", "synth"), ("config",), ("run", "curriculum"), ("cli", "main"), ("analysis",)]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# Known cycles (none today; the list only shrinks).
CYCLE_EXCEPTIONS = []


def _room_files():
  return sorted(p for room in ROOMS for p in (ROOT / room).glob("*.py"))


def _rel(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix()


def _module(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
  """(imported tlt_jax module, line) of every import in `path`, function-level ones included."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = ([f"{node.module}.{a.name}" for a in node.names] if node.module == "tlt_jax"
               else [node.module])
    else:
      continue
    for name in names:
      if name.startswith("tlt_jax."):
        yield name[len("tlt_jax."):], node.lineno


def test_file_and_function_sizes():
  too_long = []
  for path in _room_files():
    src = path.read_text()
    if len(src.splitlines()) > MAX_FILE_LINES:
      too_long.append(f"{_rel(path)}: {len(src.splitlines())} lines")
    for node in ast.walk(ast.parse(src)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        name = f"{_rel(path)}:{node.name}"
        if n > FUNCTION_EXCEPTIONS.get(name, MAX_FUNCTION_LINES):
          too_long.append(f"{name}: {n} lines")
  assert not too_long, too_long


def test_one_code_path_for_one_device():
  hits = [f"{_rel(p)}:{i}" for p in _room_files() for i, line in enumerate(p.read_text().splitlines(), 1)
          if "mesh is None" in line or "mesh is not None" in line]
  assert not hits, hits


@pytest.mark.parametrize("rel", PURE)
def test_pure_files_have_no_clock(rel):
  tree = ast.parse((ROOT / rel).read_text())
  imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert "time" not in imported, rel


@pytest.mark.parametrize("rel", HOST)
def test_host_files_build_no_programs(rel):
  tree = ast.parse((ROOT / rel).read_text())
  calls = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "jit"
           and isinstance(n.value, ast.Name) and n.value.id == "jax"]
  assert not calls, f"{rel}: jax.jit at lines {calls}"


def test_every_module_is_in_the_layer_table():
  packages = {_module(p).split(".")[0] for p in ROOT.rglob("*.py")} - {""}
  assert packages <= set(LAYER), sorted(packages - set(LAYER))


def test_no_upward_import():
  upward = []
  for path in ROOT.rglob("*.py"):
    src = _module(path).split(".")[0]
    if not src:
      continue
    for name, line in _imports(path):
      dst = name.split(".")[0]
      if LAYER[dst] > LAYER[src]:
        upward.append(f"{_rel(path)}:{line} imports tlt_jax.{name} ({src} -> {dst})")
  assert not upward, upward


def test_no_import_cycle():
  modules = {_module(p): p for p in ROOT.rglob("*.py")}
  edges = {m: {n for n, _ in _imports(p) if n in modules and n != m} for m, p in modules.items()}
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.add(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(comp)

  for m in modules:
    if m not in index:
      visit(m)
  assert [c for c in cycles if c not in CYCLE_EXCEPTIONS] == []
