"""Writes colab/zebra.ipynb: ZebraLogic puzzles generated, solved, learnt by a tiny policy and evaluated.

  python scripts/make_zebra_notebook.py
"""

import os

import nbformat as nbf

from notebook_cells import SETUP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

nb = nbf.v4.new_notebook()
cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s))  # noqa: E731
code = lambda s: cells.append(nbf.v4.new_code_cell(s))  # noqa: E731
md("""# ZebraLogic with tlt_jax (Colab CPU or local)

Logic-grid puzzles with controllable complexity (Lin et al. 2025, *ZebraLogic: On the Scaling Limits
of LLMs for Logical Reasoning*): generate a puzzle, check with a SAT solver and by brute force that
its solution is unique, measure its difficulty (search space and Z3 conflicts), then warm-start a
tiny policy on solver traces and evaluate it with best-of-N and majority-of-N. Tiny sizes, so that
it runs in under a minute on a CPU; `experiments/zebra_scaling.py` is the full run.""")
code(SETUP)

md("## 1. Generate a puzzle")
code("""import numpy as np
from tlt_jax.data.zebra import render
from tlt_jax.data.zebra.generate import generate_puzzle

puzzle = generate_puzzle(np.random.default_rng(7), num_houses=3, num_attributes=3)
print(render.puzzle_text(puzzle))
print()
print('compact:', render.compact_prompt(puzzle))""")
md("## 2. Solve it: SAT, brute force, Z3, and a human-style deduction")
code("""from tlt_jax.data.zebra.solve import brute_force_solutions, count_solutions, deduce, sat_solutions, z3_conflicts

sat = sat_solutions(puzzle.num_houses, puzzle.num_attributes, puzzle.clues, limit=5)
brute = brute_force_solutions(puzzle)
assert sat == brute == [puzzle.house_of], 'the solution must be unique'
necessary = [count_solutions(puzzle, puzzle.clues[:i] + puzzle.clues[i + 1:]) > 1 for i in range(len(puzzle.clues))]
assert all(necessary), 'the reduction keeps only necessary clues'
print(f'unique solution (SAT and brute force over {puzzle.search_space} assignments); every one of the '
      f'{len(puzzle.clues)} clues is necessary; bucket {puzzle.bucket}; Z3 conflicts {z3_conflicts(puzzle)}')
steps = deduce(puzzle)
print(render.natural_trace(puzzle, steps))
print('compact trace:', render.compact_trace(puzzle, steps))""")
md("## 3. Warm-start a tiny policy on solver traces (SFT)")
code("""import importlib.util, tempfile
from tlt_jax import config as config_lib, run as run_lib

spec = importlib.util.spec_from_file_location('zebra_config', 'configs/zebra.py')
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
config = config_lib.finalize(module.get_config('quick'))  # 2 layers, d=64, 60 SFT steps on 2..3 x 2..3
workdir = tempfile.mkdtemp(prefix='tlt_zebra_')
setup = run_lib.build_setup(config, workdir)
policy = run_lib.run_sft_stage(setup)""")
md("## 4. Evaluate across sizes: puzzle and cell accuracy, best-of-N and majority-of-N")
code("""from flax import nnx
from experiments.zebra_scaling import aggregate, eval_examples, parse_sizes, sample_responses, score_puzzles

z = config.zebra
examples = eval_examples(setup.task, parse_sizes(z.eval_sizes), z.eval_per_size, z.eval_seed)
graphdef, params = nnx.split(policy)
responses = sample_responses(params, graphdef, setup, examples, z.samples, config.rollout.temperature,
                             config.eval.max_new_tokens, config.eval.batch_size, seed=0)
rows = score_puzzles(setup.task, examples, responses, tuple(z.best_of))
for rec in aggregate(rows, 'size', 'sft', tuple(z.best_of)):
  print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
         if k in ('size', 'search_space', 'puzzle_acc', 'cell_acc', 'best_of_4', 'majority_of_4')})
print('a sample:', responses[0][0][0][:120])
print('evaluated', len(rows), 'puzzles')""")
nb['cells'] = cells
nb.metadata['kernelspec'] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, os.path.join(ROOT, 'colab', 'zebra.ipynb'))
