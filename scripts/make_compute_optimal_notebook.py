"""Writes colab/compute_optimal.ipynb: weak-cheap vs strong-expensive synthetic data at matched
FLOPs (Bansal et al. 2024) end to end at a tiny size, with the library code of
experiments/compute_optimal.py. Run from the repository root:
python scripts/make_compute_optimal_notebook.py"""

import nbformat as nbf

from notebook_cells import SETUP

nb = nbf.v4.new_notebook()
cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s))  # noqa: E731
code = lambda s: cells.append(nbf.v4.new_code_cell(s))  # noqa: E731

md("""# Compute-optimal sampling: weaker, cheaper data at matched FLOPs (tiny, Colab CPU or local)

Bansal et al. (2024), *Smaller, Weaker, Yet Better: Training LLM Reasoners via Compute-Optimal
Sampling*: at a fixed sampling budget, a weak-cheap (WC) model draws `S_WC = S_SE · P_SE / P_WC`
solutions per problem where a strong-expensive (SE) one draws `S_SE`. Its data has higher coverage
and diversity but a higher false-positive rate (a right answer reached through a wrong step), and
fine-tuning on it wins in three settings: knowledge distillation, self-improvement and
weak-to-strong.

Here the task is chain-of-thought addition, where every step is checked exactly
(`Task.check_trace`), so the FPR is exact. This notebook runs the whole of
`experiments/compute_optimal.py` at a size that takes a minute or two on a CPU; the full-size
table is in `experiments/results/compute_optimal/REPORT.md`.""")
code(SETUP)
code("""# 'notebook' (a minute or two on a CPU) or 'test' (the test suite's, seconds)
SIZE = os.environ.get('COMPUTE_OPTIMAL_NOTEBOOK_SIZE', 'notebook')
print(SIZE)""")

md("""## 1. The step verifier: a planted wrong step behind a right answer

347 + 85 in reversed digits. The second trace leaves out the carry of column 1 yet writes the right
answer: answer-correct, step 1 wrong, a false positive.""")
code("""from tlt_jax.data.tasks import get_task
task = get_task('arith')
ex = task.make_example(347, 85)
print(ex.prompt, ex.trace, task.check_trace(ex.trace, ex))
planted = '7+5=12,4+8=13,3+0+1=4;A:234'
print(planted, task.check_trace(planted, ex))
assert task.check_trace(planted, ex) == (True, False, 1)""")

md("""## 2. FLOPs and compute-matched sample counts of the experiment's policies

FLOPs per token from each config: `2 × (projections + MLP + LM head)` weights, plus
`4·L·h·hd·context` for attention when included (`tlt_jax/synth/flops.py`).""")
code("""from experiments.common import load_config
from tlt_jax.models.config import ModelConfig
from tlt_jax.synth import dense_flops_per_token, matched_sample_counts, sequence_flops
cfgs = {}
for role in ('se', 'wc', 'student'):
  m = dict(load_config(f'configs/synth.py:{role}').model)
  m['vocab_size'] = 21  # the char tokenizer of the addition task
  cfgs[role] = ModelConfig.from_dict(m)
  print(role, f'{cfgs[role].num_params:,} parameters, {dense_flops_per_token(cfgs[role]):,} FLOPs/token')
for attention in (False, True):
  cost = {r: sequence_flops(cfgs[r], 18, 90, include_attention=attention) for r in ('se', 'wc')}
  print('attention' if attention else 'no attention', {k_se: matched_sample_counts(cost, k_se * cost['se'])
                                                       for k_se in (1, 4, 10)})""")

md("""## 3. The experiment, tiny: policies, sampling, metrics, three SFT settings

`configs/synth.py:tiny`: three tiny policies SFT'd on 1-3 digit sums, sampled on 2-3 digits.""")
code("""import tempfile
from experiments import compute_optimal as co
# the test's size: short SFT, few problems, one of the three settings (self-improvement)
overrides = {} if SIZE == 'notebook' else {
    'synth.base_steps.se': 60, 'synth.base_steps.wc': 60, 'synth.problems': 6, 'synth.eval_problems': 6,
    'synth.finetune.steps': 2}
settings = None if SIZE == 'notebook' else ['self_improve']
base = load_config('configs/synth.py:tiny', overrides)
workdir = tempfile.mkdtemp(prefix='tlt_compute_optimal_')
res = co.run_all(base, workdir, settings=settings)""")
code("""from tlt_jax.utils.metrics import markdown_table
print(markdown_table(res['counts'], ['budget', 'flops_per_problem', 'k_se', 'k_wc']))
print(markdown_table(res['data'], ['budget', 'source', 'k', 'coverage', 'diversity', 'fpr', 'correct_samples']))
print(markdown_table(res['summary'], ['setting', 'budget', 'source', 'dataset', 'base_acc', 'greedy_acc', 'gain']))
for c in res['counts']:
  assert c['k_wc'] >= c['k_se'] and c['k_wc'] * res['costs']['wc'] <= c['flops_per_problem']
assert all(0.0 <= r['coverage'] <= 1.0 for r in res['data'])
print('data metrics at budgets', sorted({r['budget'] for r in res['data']}))
print('fine-tuning runs:', sum(r['kind'] == 'finetune' for r in res['finetune']))""")
code("""print(co.agreement(res))""")
nb["cells"] = cells
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "colab/compute_optimal.ipynb")
