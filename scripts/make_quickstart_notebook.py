import nbformat as nbf

from notebook_cells import SETUP
nb = nbf.v4.new_notebook()
cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s))
code = lambda s: cells.append(nbf.v4.new_code_cell(s))
md("""# tlt_jax quickstart (Colab CPU or local)

Drives the same library code as `python -m tlt_jax.main`: SFT warm start of a tiny policy on the
chain-of-thought addition task, EAGLE drafter warm-up, then lossless speculative decoding checked
against plain decoding. Tiny sizes so that it runs in about a minute on a CPU.""")
code(SETUP)

code("""import tempfile, json
import jax, numpy as np
from flax import nnx
from experiments.common import load_config
from tlt_jax import config as config_lib, run as run_lib

workdir = tempfile.mkdtemp(prefix='tlt_quickstart_')
config = load_config(overrides={
    'model.num_layers': 2, 'model.hidden_size': 64, 'model.intermediate_size': 128,
    'task.max_digits': 3, 'sft.steps': 60, 'sft.batch_size': 16, 'sft.max_len': 96,
    'sft.eval_every': 60, 'sft.eval_size': 64, 'sft.log_every': 20,
    'drafter.warmup_steps': 60, 'drafter.num_batches': 8, 'drafter.batch_size': 16, 'drafter.log_every': 30,
    'tlt.rollout_groups': 1,  # one device here; TLT's groups need one each
})
config = config_lib.finalize(config)
setup = run_lib.build_setup(config, workdir)
policy = run_lib.run_sft_stage(setup)        # SFT warm start (pure, jitted step)
drafter = run_lib.run_drafter_stage(setup, policy)  # EAGLE drafter on the policy's own features""")
code("""from tlt_jax.rollout.engine import RolloutEngine
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.speculative import SpeculativeDecoder, Strategy
from experiments.common import hard_prompts

graphdef, params = nnx.split(policy)
dgraph, dparams = nnx.split(drafter)
tok = setup.tokenizer
greedy = SamplingParams(temperature=0.0)
prompts, plens = hard_prompts(setup, 8, seed=0)
plain = RolloutEngine(graphdef, greedy, tok.eos_ids, pad_id=tok.pad_id, chunk_size=8)
spec = RolloutEngine(graphdef, greedy, tok.eos_ids, pad_id=tok.pad_id, chunk_size=8, spec_threshold=8,
                     speculative=SpeculativeDecoder(graphdef, dgraph, greedy, tok.eos_ids, strategies=[Strategy(4, 1, 4)]))
a = plain.generate(params, prompts, plens, 48, jax.random.key(0))
b = spec.generate(params, prompts, plens, 48, jax.random.key(0), drafter_params=dparams)
assert (a.tokens == b.tokens).all(), 'speculative greedy must equal plain greedy'
print('identical outputs; accept length', round(b.stats['spec_accept_len'], 2))
for i in range(3):
  print(tok.decode(prompts[i, :plens[i]]), '->', tok.decode(b.tokens[i, :b.lengths[i]]))""")
code("""from tlt_jax.utils.metrics import read_jsonl
records = read_jsonl(os.path.join(workdir, 'sft.jsonl'))
print([(r['step'], round(r['loss'], 3)) for r in records])
print('accuracy after SFT:', records[-1].get('accuracy'))""")
nb['cells'] = cells
nb.metadata['kernelspec'] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, 'colab/quickstart.ipynb')
