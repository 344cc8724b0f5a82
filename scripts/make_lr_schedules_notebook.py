"""Writes colab/lr_schedules.ipynb: learning-rate schedules from the convex bound (Schaipp et al.
2025), the bound's predictions and the measured SFT runs of experiments/lr_schedules.py at a
small size. Run from the repository root: python scripts/make_lr_schedules_notebook.py"""

import os

import nbformat as nbf

from notebook_cells import SETUP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

nb = nbf.v4.new_notebook()
cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s))  # noqa: E731
code = lambda s: cells.append(nbf.v4.new_code_cell(s))  # noqa: E731

md("""# Learning-rate schedules from the convex bound

Schaipp, Hägele, Taylor, Simsekli & Bach (2025), *The Surprising Agreement Between Convex Optimization
Theory and Learning-Rate Scheduling for Large Model Training*: the last-iterate bound of SGD on a convex
Lipschitz problem (Defazio et al. 2023, Thm. 10) follows LLM loss curves, and it tunes schedules for free.

With step sizes η_t = γ·s_t (base LR γ, shape s), the bound is `t1/γ + γ(t2 + t3)`, least at
`γ* = sqrt(t1/(t2+t3))` with value `2·sqrt(t1(t2+t3))` (`tlt_jax.train.optim.optimal_base_lr`).
This notebook computes the bound's predictions, then checks them with small SFT runs of the same code
as `experiments/lr_schedules.py` (a few minutes here; the experiment is the full run).""")
code(SETUP)
code("""# the size of the SFT runs below: 'notebook' (about two minutes on a CPU) or 'test' (seconds)
SIZE = os.environ.get('LR_SCHEDULES_NOTEBOOK_SIZE', 'notebook')
print(SIZE)""")

md("""## 1. The bound's predictions

Registered schedule shapes: `constant`, `cosine`, `wsd` (linear cooldown), `wsd_sqrt` (1−sqrt cooldown),
`wsd_two_stage`. The ratio γ*(shape)/γ*(cosine) does not depend on D and G.""")
code("""import numpy as np
from tlt_jax.train import optim
from experiments.lr_schedules import SCHEDULES, make_plan

plan = make_plan(SIZE)
T, W = plan.steps, plan.warmup
for label, name, options in SCHEDULES:
  best = optim.optimal_base_lr(name, T, warmup_steps=W, **options)
  print(f'{label:9s} gamma* = {best.lr:.4f}  bound(gamma*) = {best.bound:.4f}  '
        f'predicted gamma*({label})/gamma*(cosine) = {optim.predicted_lr_ratio(name, "cosine", T, options, warmup_steps=W):.3f}')
for c in (0.1, 0.2, 0.4, 0.6):
  print(f'wsd cooldown {c}: gamma* = {optim.optimal_base_lr("wsd", T, warmup_steps=W, decay_frac=c).lr:.4f}')
two = optim.two_stage_options(T, 2 * T, warmup_steps=W)
print('extending a tuned', T, 'step WSD run to', 2 * T, 'steps: two-stage options', {k: round(v, 3) for k, v in two.items()})
horizon_ratio = optim.optimal_base_lr('wsd', 2 * T, warmup_steps=W).lr / optim.optimal_base_lr('wsd', T, warmup_steps=W).lr
print(f'or plain WSD over {2 * T} steps at {horizon_ratio:.3f} x the tuned LR')""")
code("""import matplotlib.pyplot as plt
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for label, name, options in SCHEDULES:
  s = optim.schedule_shape(name, T, W, **options)
  gamma = optim.optimal_base_lr(s).lr
  axes[0].plot(gamma * s, label=label)
  axes[1].plot(np.arange(1, T + 1), optim.bound_curve(gamma * s), label=label)
axes[0].set_title('schedule at its own gamma*'); axes[1].set_title('bound Omega_t (D = G = 1)')
axes[1].set_ylim(0, 3 * np.nanmin(optim.bound_curve(gamma * s)))
for ax in axes: ax.legend(); ax.set_xlabel('step'); ax.grid(alpha=0.3)
plt.show()""")
md("""## 2. Measured: SFT of a small policy

The `:tiny` policy of `configs/default.py` trained from scratch with each schedule (parts (i)–(iv) of the
experiment: an LR sweep per schedule, cooldown fractions, horizon transfer), the loss measured on fixed
held-out batches (`tlt_jax.train.sft.heldout_loss`). One compact JSON line per run.""")
code("""import tempfile
from experiments.common import load_config
from experiments.lr_schedules import run_all

config = load_config('configs/default.py:tiny')
out_dir = tempfile.mkdtemp(prefix='lr_schedules_nb_')
analysis = run_all(config, plan, {'i', 'ii', 'iii', 'iv'}, tempfile.mkdtemp(), out_dir)
for row in analysis['lr_ratio_rows']:
  print(f"{row['schedule']:9s} measured best LR ratio to cosine {row['measured_ratio']:.2f}  "
        f"predicted {row['predicted_ratio']:.2f}  best measured final val_loss {row['best_final_val']:.4f}")
for c in analysis['curves']:
  print(f"{c['schedule']:9s} at peak LR {plan.lr:g}: measured final val_loss {c['final_val']['mean']:.4f}  bound {c['bound']:.4f}")""")
code("""from IPython.display import Markdown, Image, display
display(Markdown(open(os.path.join(out_dir, 'lr_schedules.md')).read()))
for name in ('curves', 'sweep', 'cooldown', 'horizon'):
  path = os.path.join(out_dir, f'lr_schedules_{name}.png')
  if os.path.exists(path):
    display(Image(path))""")
md("""The full experiment (300-step runs, 3 seeds, a 9-point LR grid; ~16 minutes on 2 CPU cores):

    python experiments/lr_schedules.py

Its committed results are in `experiments/results/lr_schedules/REPORT.md`.""")

nb["cells"] = cells
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, os.path.join(ROOT, "colab", "lr_schedules.ipynb"))
