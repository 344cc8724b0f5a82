"""Cells every Colab notebook starts with (the notebook generators in scripts/ import this)."""

# Fresh Colab: clone and install the repository (TLT_REPO names your clone); then, anywhere, run
# from the repository root with it on sys.path.
SETUP = """import os, sys, subprocess
if 'google.colab' in sys.modules:  # fresh Colab: fetch and install the repo first
  if not os.path.exists('tlt_jax'):
    repo = os.environ.get('TLT_REPO')
    if not repo:
      raise SystemExit('Set TLT_REPO to the git URL of your tlt_jax clone first, e.g. '
                       'os.environ["TLT_REPO"] = "https://github.com/<you>/tlt_jax"')
    subprocess.run(['git', 'clone', repo, 'tlt_jax_repo'], check=True)
    os.chdir('tlt_jax_repo')
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-r', 'requirements.txt', '-e', '.'], check=True)
while not os.path.exists('configs/default.py') and os.getcwd() != '/':  # the repository root
  os.chdir('..')
sys.path.insert(0, os.getcwd())
print(os.getcwd())"""
