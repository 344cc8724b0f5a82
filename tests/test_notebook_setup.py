"""The Colab setup cell (scripts/notebook_cells.py), run as on Colab: it clones REPO_URL into
the folder it checks for, works from there, and a second run (a restarted runtime) clones and
installs nothing again."""

import os
import pathlib
import subprocess
import sys
import types

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
from notebook_cells import SETUP  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLACEHOLDER = "'https://github.com/YOUR_ACCOUNT/tlt_jax.git'"


def _cell(repo_url: str, repo_dir: pathlib.Path) -> str:
  assert SETUP.startswith("REPO_URL = " + PLACEHOLDER)  # the one place a user sets
  return SETUP.replace(PLACEHOLDER, repr(repo_url), 1).replace("'/content/tlt_jax'", repr(str(repo_dir)), 1)


@pytest.fixture
def colab(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(tmp_path)  # Colab starts (and restarts) in /content
  return tmp_path


def test_setup_cell_clones_once_and_survives_restart(colab, capsys):
  origin = colab / "origin"  # a repository to clone: this checkout's committed tree
  subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(origin)], check=True)
  repo_dir = colab / "content" / "tlt_jax"
  exec(_cell(f"file://{origin}", repo_dir), {})
  assert pathlib.Path.cwd() == repo_dir and (repo_dir / "configs" / "default.py").is_file()
  assert sys.path[0] == str(repo_dir) and capsys.readouterr().out.strip() == str(repo_dir)
  (repo_dir / "marker").write_text("kept")
  os.chdir(colab)  # runtime restart: back in /content, the clone still on disk
  exec(_cell("file:///nonexistent/never/cloned", repo_dir), {})  # no clone attempted
  assert pathlib.Path.cwd() == repo_dir and (repo_dir / "marker").read_text() == "kept"


def test_setup_cell_asks_for_the_url(colab):
  with pytest.raises(SystemExit, match="Set REPO_URL"):
    exec(SETUP.replace("'/content/tlt_jax'", repr(str(colab / "tlt_jax")), 1), {})
