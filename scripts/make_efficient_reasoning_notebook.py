"""Writes colab/efficient_reasoning.ipynb: the length-penalty family at a tiny size (run from the repo root)."""

import nbformat as nbf

from notebook_cells import SETUP

nb = nbf.v4.new_notebook()
cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s))  # noqa: E731
code = lambda s: cells.append(nbf.v4.new_code_cell(s))  # noqa: E731
md("""# Efficient reasoning: one alpha per policy (tiny, Colab CPU or local)

Arora & Zanette (2025), "Training Language Models to Reason Efficiently": RL with the reward
`r = 1[correct] * (1 - alpha * sigmoid((len - mean) / std))` (mean and std over the correct
responses to the same prompt), RLOO advantages whitened over the batch, the loss averaged per
sequence and a KL of 0.001 (`configs/efficient_reasoning.py`) gives, one alpha per model, a family that trades
accuracy for length. This notebook drives the same library code as
`experiments/efficient_reasoning.py`, at a size that runs in a minute or two on a CPU: a tiny SFT
policy, two alphas, two RL steps each, one seed. The measured tables (3 seeds) are in
`experiments/results/efficient_reasoning/REPORT.md`.""")
code(SETUP)

md("""The reward on one hand-made group: among correct answers, shorter ones score more; a wrong or
unfinished (no EOS) response scores 0.""")
code("""import numpy as np
from tlt_jax.data.tasks import get_task
from tlt_jax.rl import rewards
task = get_task('arith')
ex = task.make_example(47, 5)
right = ex.trace
fn = rewards.get_reward('length_penalty', alpha=0.4)
longer = right.replace(';A:', '|R:7+5=12;A:')  # the same answer after a redundant re-check
r = fn([right, longer, 'A:1', right], [True, True, True, False], [len(right), len(longer), 3, len(right)], ex, task)
print(np.round(r, 3))
assert r[0] > r[1] > 0 and r[2] == 0 and r[3] == 0""")
code("""import tempfile
from experiments.common import JsonlWriter, load_config
from experiments.efficient_reasoning import ensure_policy, evaluate, held_out, rl_overrides, summarize, train_and_evaluate

workdir = tempfile.mkdtemp(prefix='tlt_efficient_')
base = load_config('configs/efficient_reasoning.py:tiny', overrides={
    'tlt.rollout_groups': 1,  # one device here; TLT's groups need one each
    'sft.steps': 60, 'rl.steps': 2,
})
setup, policy = ensure_policy(workdir, base)
examples = held_out(setup.task, per_digit=4)
sft = evaluate(policy, setup, examples, samples=1)
family = {}
with JsonlWriter(os.path.join(workdir, 'family.jsonl')) as write:
  for alpha in (0.0, 0.4):
    family[alpha] = {0: train_and_evaluate(f'alpha_{alpha:g}', base, rl_overrides(alpha, seed=0, lr=1e-3), setup,
                                           policy, examples, 1, os.path.join(workdir, 'family'), write)}
rows = summarize(family, sft, seeds=[0])""")
code("""from tlt_jax.utils.metrics import markdown_table
cols = ['alpha', 'band', 'sampled_tokens_mean', 'sampled_tokens_change', 'sampled_acc_mean', 'sampled_acc_change',
        'greedy_acc_mean', 'rechecks_mean']
print(markdown_table([r for r in rows if r['band'] == 'all'], cols))
row = [r for r in rows if r['alpha'] == 0.4 and r['band'] == 'all'][0]
ref = [r for r in rows if r['alpha'] == 0.0 and r['band'] == 'all'][0]
assert abs(row['sampled_tokens_change'] - (row['sampled_tokens_mean'] / ref['sampled_tokens_mean'] - 1)) < 1e-9
assert all(0.0 <= r['sampled_acc_mean'] <= 1.0 and r['sampled_tokens_mean'] > 0 for r in rows)
print('family evaluated:', sorted({str(r['alpha']) for r in rows}))""")
nb["cells"] = cells
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "colab/efficient_reasoning.ipynb")
