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
responses to the same prompt) and RLOO advantages gives, one alpha per model, a family that trades
accuracy for length. This notebook drives the same library code as
`experiments/efficient_reasoning.py`, at a size that runs in a minute or two on a CPU: a tiny SFT
policy, two alphas, two RL steps each. The full-size table is in the README.""")
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
from experiments.common import ensure_policy_and_drafter, load_config
from experiments.efficient_reasoning import held_out, run_family, table_rows

workdir = tempfile.mkdtemp(prefix='tlt_efficient_')
base = load_config('configs/default.py:tiny', overrides={
    'tlt.rollout_groups': 1,  # one device here; TLT's groups need one each
    'sft.steps': 60, 'rl.lr': 1e-3,
})
setup, policy, drafter = ensure_policy_and_drafter(workdir, config=base)
examples = held_out(setup.task, per_digit=4)
results, sft = run_family(base, setup, policy, drafter, alphas=[0.4], steps=2, advantage='rloo',
                          examples=examples, samples=1, runs_dir=os.path.join(workdir, 'family'))
rows = table_rows(results, sft)""")
code("""from tlt_jax.utils.metrics import markdown_table
cols = ['alpha', 'band', 'sampled_tokens', 'token_change', 'sampled_acc', 'acc_change', 'greedy_acc', 'rechecks']
print(markdown_table([r for r in rows if r['band'] == 'all'], cols))
ref = [r for r in rows if r['alpha'] == 0.0 and r['band'] == 'all'][0]
assert ref['token_change'] == 0.0 and ref['acc_change'] == 0.0
assert all(0.0 <= r['sampled_acc'] <= 1.0 and r['sampled_tokens'] > 0 for r in rows)
print('family evaluated:', sorted({str(r['alpha']) for r in rows}))""")
nb["cells"] = cells
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "colab/efficient_reasoning.ipynb")
