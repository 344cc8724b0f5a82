"""The Colab notebooks run top to bottom (each asserts its own results) and print what they should."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# notebook -> text its outputs must contain
NOTEBOOKS = {
    "quickstart.ipynb": ["identical outputs; accept length"],
    "zebra.ipynb": ["unique solution (SAT and brute force", "evaluated 12 puzzles", "'size': '3x3'"],
    "efficient_reasoning.ipynb": ["family evaluated: ['0.0', '0.4', 'sft']"],
}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name):
  nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
  env_flags = os.environ.pop("XLA_FLAGS", None)  # a notebook runs with the default one device
  try:
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  finally:
    if env_flags is not None:
      os.environ["XLA_FLAGS"] = env_flags
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  for expected in NOTEBOOKS[name]:
    assert expected in outputs, f"{name}: {expected!r} not in the outputs"
