"""An RL run's policy (its orbax checkpoint) -> a HF checkpoint directory (config.json,
safetensors, tokenizer files with the chat template) that transformers and vLLM load.

  python scripts/export_hf.py --workdir=runs/q15 --out=runs/q15/hf [--step=N]

Reads `<workdir>/config.json` (written by every run) for the model's architecture (from
`init_from`'s config.json, or the config's model block) and the tokenizer, restores the policy's
parameters of step N (default: the newest) from `<workdir>/ckpt_rl/` onto this machine's first
device, whatever mesh the run had, and writes them with `tlt_jax.models.hf.save_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pure(tree):
  """nnx.State as orbax stores it ({..., "value": array}) -> a pure dict of arrays."""
  if isinstance(tree, dict):
    if set(tree) == {"value"}:
      return tree["value"]
    return {k: _pure(v) for k, v in tree.items()}
  return tree


def restore_policy_params(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, the policy's parameters as a pure dict) of `<workdir>/ckpt_rl`, on one device."""
  import jax
  import orbax.checkpoint as ocp

  root = os.path.join(os.path.abspath(workdir), "ckpt_rl")
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise FileNotFoundError(f"{root} holds no RL checkpoint")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ValueError(f"step {step} is not in {root}; allowed: {steps}")
  path = os.path.join(root, str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree,
                          is_leaf=is_array)
  state = ckptr.restore(path, abstract)
  return step, _pure(state["policy"]["params"])


def load_policy(workdir: str, step: int | None = None):
  """(step, the RL policy as a `Transformer`) of a run's workdir."""
  from flax import nnx

  from tlt_jax.data.tokenizer import load_tokenizer
  from tlt_jax.models import hf
  from tlt_jax.models.config import ModelConfig
  from tlt_jax.models.transformer import Transformer

  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  if config.get("init_from"):
    cfg = hf.check_checkpoint(config["init_from"]).with_execution(dict(config["model"]))
  else:
    model = dict(config["model"])
    if not model.get("vocab_size"):
      model["vocab_size"] = load_tokenizer(config["tokenizer"]).vocab_size
    cfg = ModelConfig.from_dict(model)
  step, params = restore_policy_params(workdir, step)
  policy = Transformer(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(policy, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(policy, state)
  return step, policy, config


def export(workdir: str, out: str, step: int | None = None) -> str:
  """Writes the RL policy of `workdir` (step `step`, default newest) to `out` in HF layout."""
  from tlt_jax.data.tokenizer import load_tokenizer
  from tlt_jax.models import hf

  step, policy, config = load_policy(workdir, step)
  hf.save_pretrained(policy, out)
  if config.get("tokenizer") and config["tokenizer"] != "char":
    load_tokenizer(config["tokenizer"]).save(out)  # tokenizer.json + tokenizer_config.json (chat template)
  elif config.get("tokenizer") == "char":
    print("export_hf: the run used the character tokenizer; no HF tokenizer written", file=sys.stderr)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--step", type=int, default=None)
  a = ap.parse_args(argv)
  try:
    export(a.workdir, a.out, a.step)
  except (OSError, ValueError) as e:
    print(f"export_hf: {e}", file=sys.stderr)
    return 2
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
