"""Writes colab/self_improve.ipynb: self-improvement for length generalisation (Lee et al. 2025)
at a small size, the same code as experiments/self_improve.py. Run from the repository root:
python scripts/make_self_improve_notebook.py"""

import os

import nbformat as nbf

from notebook_cells import SETUP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

nb = nbf.v4.new_notebook()
cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s))  # noqa: E731
code = lambda s: cells.append(nbf.v4.new_code_cell(s))  # noqa: E731

md("""# Self-improving transformers: length generalisation round by round

Lee et al. (2025), *Self-Improving Transformers Overcome Easy-to-Hard and Length Generalization Challenges*.
A transformer with **no positional embedding** (NoPE, `model.position_embedding = "none"`) learns reverse
addition on short numbers. Then, each round, the models label problems one digit longer than they have
seen (greedy, batched through the rollout engine), the labels are filtered, and each model continues
training on them for one WSD phase from its checkpoint.

Filters: **length** keeps an answer only if it ended with EOS and has a well-formed length (n or
n + 1 digits; exactly n + 1 when padded); **majority vote** keeps a problem only if at least 70 % of
the k models (different seeds) agree. This notebook
runs the three variants of `experiments/self_improve.py` (no filter, length only, length + vote) for a
few rounds at a small size and draws the accuracy-by-digits heatmap.""")
code(SETUP)
code("""# 'test': a tiny model and 2 rounds (seconds; the test suite runs this) or 'notebook' (minutes)
SIZE = os.environ.get('SELF_IMPROVE_NOTEBOOK_SIZE', 'notebook')
print(SIZE)""")

md("""## 1. The task and its verifier

Operands and answer are written least-significant digit first. The default is the official code's
format, unpadded (`{a[::-1]}+{b[::-1]}=`, the reversed sum: n or n + 1 digits); `padded=True`
zero-pads the operands to n digits and the sum to n + 1. The verifier is exact; the length filter
checks the answer's form only.""")
code("""from tlt_jax.data.tasks import get_task
task = get_task('reverse_add')                 # unpadded, the default
ex = task.make_example(347, 85)
print(repr(ex.prompt), '->', repr(ex.answer), '| verify:', task.verify('234', ex), task.verify('2340', ex),
      '| well formed:', task.well_formed('234', 3), task.well_formed('2340', 3))
task = get_task('reverse_add', padded=True)    # zero-padded: the planted labels below use it
ex = task.make_example(347, 85)
print(repr(ex.prompt), '->', repr(ex.answer), '| well formed:', task.well_formed('2350', 3),
      task.well_formed('23500', 3))""")

md("""## 2. The filters on planted labels

Three models answer three problems; model 1 gets problem 1 wrong, others are too short, too long or
never end.""")
code("""from tlt_jax.curriculum import self_improve as si
exs = [task.make_example(347, 85), task.make_example(999, 1), task.make_example(100, 200)]
answers = [['2340', '0001', '003'], ['2340', '0002', '0030'], ['2340', '0002', '00300']]
finished = [[True, True, True], [True, True, True], [True, False, True]]
for mode in si.FILTERS:
  out = si.filter_labels(task, exs, answers, finished, mode, 0.7)
  print(f'{mode:12s} kept {out.stats["kept"]}  wrong {out.stats["kept_wrong"]}  labels {out.labels}')""")

md("""## 3. Self-improvement rounds, per filter

Round 0 (SFT on 1..N digits) is shared; each variant then runs its rounds. One JSON line per round:
the digits labelled, the reach (largest n with every length up to n solved at >= 90 %), the labels
kept and their error rate against the true sums.""")
code("""import json, tempfile
from experiments.common import load_config
from experiments.self_improve import run_variants, table_rows, plot_heatmap

if SIZE == 'test':
  config = load_config('configs/self_improve.py:tiny')
else:
  config = load_config('configs/self_improve.py', {'self_improve.rounds': 3, 'sft.round0_steps': 1500})
workdir = tempfile.mkdtemp(prefix='self_improve_nb_')

def show(variant, rec):
  lab = rec['labels'] or {}
  print(json.dumps({'variant': variant, 'round': rec['round'], 'label_digits': rec['label_digits'],
                    'reach': rec['reach'], 'kept': lab.get('kept'), 'kept_error_rate': lab.get('kept_error_rate')}))

histories = run_variants(config, si.FILTERS, workdir, show)
rounds = config.self_improve.rounds
assert all(len(h) == rounds + 1 for h in histories.values())
print('rounds per variant:', {v: len(h) for v, h in histories.items()})""")
code("""from tlt_jax.utils.metrics import markdown_table
cols = ['filter', 'round', 'labelled_digits', 'reach', 'acc_frontier', 'acc_frontier+1', 'kept', 'raw_error', 'kept_error']
print(markdown_table(table_rows(histories), cols))
path = os.path.join(workdir, 'heatmap.png')
plot_heatmap(histories, path)
from IPython.display import Image, display
display(Image(path))""")
md("""The full run and its numbers beside the paper's (10 -> 100+ digits with a 6-layer d=384 model; a
different scale from this CPU-sized one) are in `experiments/results/self_improve/REPORT.md`.""")

nb["cells"] = cells
nb["metadata"] = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                  "language_info": {"name": "python"}}
path = os.path.join(ROOT, "colab", "self_improve.ipynb")
nbf.write(nb, path)
print("wrote", path)
