"""The ZebraLogic Colab notebook runs top to bottom (it asserts uniqueness and minimality itself)."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_zebra_notebook_runs():
  nb = nbformat.read(os.path.join(ROOT, "colab", "zebra.ipynb"), as_version=4)
  env_flags = os.environ.pop("XLA_FLAGS", None)  # the notebook runs with the default one device
  try:
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  finally:
    if env_flags is not None:
      os.environ["XLA_FLAGS"] = env_flags
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "unique solution (SAT and brute force" in outputs
  assert "evaluated 12 puzzles" in outputs
  assert "'size': '3x3'" in outputs
