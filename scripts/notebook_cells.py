"""Cells every Colab notebook starts with (the notebook generators in scripts/ import this)."""

# The setup cell. On Colab: clone REPO_URL (its first line, the one place to set) into
# /content/tlt_jax unless a clone is already there, install the runtime packages (`pip install
# -e .`: requirements.txt, no test tools) unless tlt_jax already imports, and work from the
# clone. Each step is skipped when already done, so the cell survives a runtime restart and
# re-runs. Anywhere else (a local checkout, the tests): run from the repository root.
SETUP = """REPO_URL = 'https://github.com/YOUR_ACCOUNT/tlt_jax.git'  # <- the tlt_jax repository to run on Colab
REPO_DIR = '/content/tlt_jax'
import os, sys, subprocess
if 'google.colab' in sys.modules:
  if not os.path.exists(os.path.join(REPO_DIR, 'configs', 'default.py')):
    if 'YOUR_ACCOUNT' in REPO_URL:
      raise SystemExit('Set REPO_URL (the first line of this cell) to the git URL of your tlt_jax repository.')
    subprocess.run(['git', 'clone', '--depth', '1', REPO_URL, REPO_DIR], check=True)
  os.chdir(REPO_DIR)
  if subprocess.run([sys.executable, '-c', 'import tlt_jax'], cwd='/', capture_output=True).returncode:
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-e', '.'], check=True)
while not os.path.exists('configs/default.py') and os.getcwd() != '/':  # the repository root
  os.chdir('..')
sys.path.insert(0, os.getcwd())
print(os.getcwd())"""
