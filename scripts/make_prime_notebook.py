"""Writes colab/prime.ipynb: PRIME vs outcome-only RLOO at a tiny size (run from the repo root)."""

import nbformat as nbf

from notebook_cells import SETUP

nb = nbf.v4.new_notebook()
cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s))  # noqa: E731
code = lambda s: cells.append(nbf.v4.new_code_cell(s))  # noqa: E731
md("""# PRIME: implicit process rewards (tiny, Colab CPU or local)

Cui et al. (2025), "Process Reinforcement through Implicit Rewards". An implicit PRM, a language
model `pi_psi` against the frozen SFT policy `pi_ref`, gives every token the reward
`r_t = beta * (log pi_psi(y_t) - log pi_ref(y_t))`; it learns online from the verifier's outcome
labels only, with `BCE(sigmoid(sum_t r_t), correct)`. As in the official code, the token rewards
are divided by the batch's largest |process return-to-go| (`prime.process_norm = "batch_norm"`);
RLOO then runs on each reward source separately (outcome at the last token, process rewards
against the group's mean rewards), with returns and whitening. This notebook drives the same library code as `experiments/prime.py`
(`configs/prime.py`), at a size that runs in under a minute: a tiny SFT policy, RLOO with and
without the PRM. The measured full-size table is in the README.""")
code(SETUP + """
SIZE = os.environ.get('PRIME_NOTEBOOK_SIZE', 'notebook')  # 'test': the smallest run (the test suite)
print(SIZE)""")

md("""The advantage estimator on one hand-made group of 3 responses: the outcome (1, 0, 0) gives RLOO
advantages (1, -1/2, -1/2) at the last token; process rewards add their own leave-one-out terms,
`G/(G-1) q_t - sum_j mean(q_j) / (G-1)` per token; returns sum them from each token to the end
(gamma = 1). Whitening off here, to read the numbers.""")
code("""import jax.numpy as jnp, numpy as np
from tlt_jax.rl import advantages
mask = jnp.array([[[1, 1, 0], [1, 1, 1], [1, 0, 0]]], jnp.float32)
q = jnp.array([[[0.2, 0.4, 0], [0.0, 0.0, 0.3], [0.6, 0, 0]]], jnp.float32)
inputs = advantages.AdvantageInputs(jnp.array([[1.0, 0.0, 0.0]]), q, mask)
outcome = advantages.get_advantage('rloo_returns', process_coef=0.0, whiten=False)(inputs)
both = advantages.get_advantage('rloo_returns', whiten=False)(inputs)
print(np.round(np.asarray(outcome[0]), 3)); print(np.round(np.asarray(both[0]), 3))
assert np.allclose(outcome[0], [[1, 1, 0], [-.5, -.5, -.5], [-.5, 0, 0]])
# process: mean rewards (0.3, 0.1, 0.6) sum to 1.0; token t of response 0: 1.5 q_t - 1.0 / 2
assert np.allclose(both[0, 0], [1 + (1.5 * 0.2 - .5) + (1.5 * 0.4 - .5), 1 + (1.5 * 0.4 - .5), 0], atol=1e-6)""")

md("""RLOO with and without the implicit PRM, from one tiny SFT policy, the same seeds and prompts;
both keep the groups whose accuracy lies in `rl.accuracy_band` (PRIME's online filter).""")
code("""import tempfile
from experiments.common import load_config
from experiments.prime import ensure_policy, run_arms, summarize

from tlt_jax.utils.compile_cache import enable_compile_cache
workdir = tempfile.mkdtemp(prefix='tlt_prime_')
enable_compile_cache(os.path.join(workdir, 'xla'), min_compile_time_s=0.0)  # the 2nd run reuses the 1st's programs
test = SIZE == 'test'
base = load_config('configs/prime.py:tiny', overrides={
    'tlt.rollout_groups': 1,  # one device here; TLT's groups need one each
    'sft.steps': 8 if test else 60, 'rl.lr': 1e-3, 'prime.lr': 1e-3,
    'rl.accuracy_band': (0.0, 1.0) if test else (0.2, 0.8),  # a 12-step SFT policy solves nothing
    'rollout.max_new_tokens': 32 if test else 48,
    'rl.steps': 1 if test else 6, 'rl.sample_eval_every': 1 if test else 2,
    'rl.sample_eval_size': 4 if test else 32,
})
setup, policy = ensure_policy(workdir, base)
runs = run_arms(base, setup, policy, os.path.join(workdir, 'runs'), seeds=[0])
summary = summarize(runs, margin=0.02)
runs = {arm: by_seed[0] for arm, by_seed in runs.items()}""")
code("""for name, v in runs.items():
  print(name, [(e['step'], e['rollouts'], round(e['eval_accuracy'], 3)) for e in v['evals']])
print('PRM pairwise ranking accuracy per step (before / after its update; 0.5 = chance):',
      [(r.get('prm_pairwise_acc_before'), r.get('prm_pairwise_acc_after')) for r in runs['prime']['records']])
print('PRM sign accuracy per step:', [round(r['prm_sign_accuracy'], 3) for r in runs['prime']['records']])
print({k: summary[k]['mean'] for k in ('sft_accuracy', 'sample_efficiency')}, summary['final_accuracy'])
assert all(r['prm_grad_norm'] > 0 for r in runs['prime']['records'])  # the PRM learned every step
assert all('prm_loss' not in r for r in runs['rloo']['records'])  # the baseline has no PRM
assert runs['rloo']['evals'][0]['eval_accuracy'] == runs['prime']['evals'][0]['eval_accuracy']  # same start
print('runs compared:', sorted(runs))""")
nb["cells"] = cells
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "colab/prime.ipynb")
