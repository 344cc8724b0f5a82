"""The Colab notebooks run top to bottom (each asserts its own results) and print what they should."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# notebook -> (text its outputs must contain, environment it runs with)
NOTEBOOKS = {
    "quickstart.ipynb": (["identical outputs; accept length"], {}),
    "zebra.ipynb": (["unique solution (SAT and brute force", "evaluated 12 puzzles", "'size': '3x3'"], {}),
    "efficient_reasoning.ipynb": (["family evaluated: ['0.0', '0.4', 'sft']"], {}),
    "lr_schedules.ipynb": (["predicted gamma*(wsd)/gamma*(cosine)", "measured final val_loss"],
                           {"LR_SCHEDULES_NOTEBOOK_SIZE": "test"}),
    "compute_optimal.ipynb": (["steps_correct=False, first_wrong_step=1", "data metrics at budgets [1, 2]",
                               "fine-tuning runs: 4"],
                              {"COMPUTE_OPTIMAL_NOTEBOOK_SIZE": "test"}),
    "self_improve.ipynb": (["rounds per variant: {'none': 3, 'length': 3, 'length+vote': 3}",
                            "length+vote  kept 3  wrong 0"], {"SELF_IMPROVE_NOTEBOOK_SIZE": "test"}),
    "prime.ipynb": (["runs compared: ['prime', 'rloo']"], {"PRIME_NOTEBOOK_SIZE": "test"}),
    "scone.ipynb": (["training-time embeddings equal the table lookups: True",
                     "cached decode equals full forward"], {"SCONE_NOTEBOOK_SIZE": "test"}),
}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name, monkeypatch):
  expected, env = NOTEBOOKS[name]
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # a notebook runs with the default one device
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  for text in expected:
    assert text in outputs, f"{name}: {text!r} not in the outputs"
