"""Plain greedy decoding speed on this machine: this engine against peers, side by side.

For each model shape (A: d=128, 2 layers, ffn 256; B: d=256, 4 layers, ffn 512, both with 4
heads and vocabulary 256; and the default policy's shape) it writes one random Llama checkpoint
in the HF format (safetensors), then times the greedy generation of `--new_tokens` tokens after
`--prompt_len`-token prompts at each batch size by every contender, in separate processes,
alternating contenders and repeating the sweep (`--repeats`); the best run counts, since other
processes only ever slow a run down. Contenders:

  tlt_jax   this tree's `RolloutEngine.generate` (chunk size 16, no EOS stop), attending to the
            whole cache (the engine's default);
  tlt_jax_live  the same with a live attention window (`window_block` 32: a chunk attends to the
            cache slots its rows can have reached, rounded up to 32; one program per window);
  before    the same code from another checkout (`--before=DIR`, e.g. a `git worktree` of an
            older commit), run with that checkout first on PYTHONPATH;
  hf, tunix HF transformers `generate` (torch CPU) and Tunix's sampler, run by
            scripts/peer_decode_bench.py with `--peer_python` (a separate virtualenv: neither is
            a dependency of this project).

The CPU's float32 peak is a 2048x2048 matmul under `jax.jit` (experiments/common.py, as
rollout_speedup.py measures it), measured at the start and the end
of the run. Decode FLOPs are 2 x parameters per token (attention's share is left out, so the
GFLOP/s are a lower bound). Every contender's generated tokens are hashed: equal hashes mean the
same greedy outputs; `agree` is the fraction of tokens equal to this engine's.

  python -m venv /tmp/peer && /tmp/peer/bin/pip install google-tunix==0.1.7 torch==2.13.0 transformers
  git worktree add /tmp/before <older commit>
  python experiments/decode_bench.py [--batches 1,8,64] [--before /tmp/before] [--peer_python /tmp/peer/bin/python]
  python experiments/decode_bench.py --profile   # where this engine's decode time goes, by XLA op kind

Writes OUT/decode_bench.{jsonl,md,png}.
"""

from __future__ import annotations

import collections
import gzip
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)  # after PYTHONPATH: the 'before' worker imports the other checkout's tlt_jax

from experiments.common import Output, define_output_flags, pyplot, run_experiment, timed  # noqa: E402

SHAPES = {
    "A": dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=256),
    "B": dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=4, vocab_size=256),
    "default": None,  # configs/default.py's model, vocabulary from its tokenizer
}

define_output_flags("experiments/results/decode_bench")
flags.DEFINE_string("shapes", "A,B,default", "model shapes (A, B, default)")
flags.DEFINE_string("batches", "1,8,64", "batch sizes")
flags.DEFINE_integer("prompt_len", 16, "prompt tokens per row")
flags.DEFINE_integer("new_tokens", 128, "generated tokens per row")
flags.DEFINE_integer("repeats", 2, "alternating sweeps over the contenders (the best run counts)")
flags.DEFINE_string("before", "", "another checkout of this project to time as 'before'")
flags.DEFINE_string("peer_python", "", "python of a virtualenv with torch+transformers and google-tunix")
flags.DEFINE_string("peers", "hf,tunix", "peer implementations run with --peer_python")
flags.DEFINE_bool("profile", False, "also profile this engine's decode chunk per XLA op kind")
flags.DEFINE_string("worker_ckpt", "", "(internal) time this engine on the checkpoint DIR")
flags.DEFINE_integer("window_block", 0, "(internal) the worker engine's live-window block")


def _jax():
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  return jax


def write_checkpoint(shape: str, path: str) -> dict:
  """A random checkpoint of `shape` in `path`; returns the model config as a dict."""
  _jax()
  from tlt_jax.models.config import ModelConfig
  from tlt_jax.models.hf import save_pretrained
  from tlt_jax.models.transformer import init_model
  if SHAPES[shape] is None:
    from experiments.common import load_config
    from tlt_jax.run import build_setup
    with tempfile.TemporaryDirectory() as wd:
      cfg = build_setup(load_config(overrides={"tlt.rollout_groups": 1}), os.path.join(wd, "w")).model_cfg
  else:
    cfg = ModelConfig(**SHAPES[shape])
  from flax import nnx
  model = init_model(cfg, seed=0)
  # std 0.02 weights make a near-constant greedy output; x4 (std 0.08) makes it vary, so equal
  # tokens across contenders mean something
  jax = _jax()
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, params))
  save_pretrained(model, path)
  n = sum(int(x.size) for x in jax.tree.leaves(params))
  return dict(params=n, hidden=cfg.hidden_size, layers=cfg.num_layers, ffn=cfg.intermediate_size,
              heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, vocab=cfg.vocab_size)


def prompts(batch: int, prompt_len: int, vocab: int) -> np.ndarray:
  return np.random.RandomState(0).randint(1, vocab, (batch, prompt_len)).astype(np.int32)


def tokens_sha(tokens_BxN: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(tokens_BxN, np.int32).tobytes()).hexdigest()


def worker(ckpt: str, batches, prompt_len: int, new_tokens: int, profile: bool, window_block: int) -> None:
  """Times `RolloutEngine.generate` (whichever tlt_jax is first on the path) on `ckpt`; prints one
  JSON line per batch, and with `profile` the decode time per XLA op kind."""
  jax = _jax()
  from flax import nnx
  from tlt_jax.models import hf
  from tlt_jax.rollout.engine import RolloutEngine
  from tlt_jax.rollout.sampling import SamplingParams
  model = hf.from_pretrained(ckpt)
  graphdef, params = nnx.split(model)
  vocab = model.cfg.vocab_size
  # An EOS id the model cannot emit: every row decodes exactly new_tokens tokens.
  engine = RolloutEngine(graphdef, SamplingParams(temperature=0.0), eos_ids=(vocab,), window_block=window_block)
  for b in batches:
    prompt = prompts(b, prompt_len, vocab)
    lens = np.full((b,), prompt_len, np.int32)

    def run():
      return engine.generate(params, prompt, lens, new_tokens, jax.random.key(0))

    best = min(timed(run, 3))  # the first (untimed) call compiles
    res = run()
    line = dict(batch=b, best_s=best, tok_s=b * new_tokens / best,
                tokens_sha=tokens_sha(res.tokens[:, :new_tokens]),
                tokens=res.tokens[:, :new_tokens].tolist())
    if profile:
      line["profile_ms_per_step"] = _profile(run, new_tokens)
    print(json.dumps(line), flush=True)


def _profile(run, new_tokens: int) -> dict:
  """Milliseconds per decode step of each XLA op kind (the op name without its number), from a
  jax.profiler trace of one generation."""
  jax = _jax()
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      run()
    trace = json.load(gzip.open(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]))
  per_kind = collections.Counter()
  for e in trace["traceEvents"]:
    name = e.get("name", "")
    if e.get("ph") != "X" or not name[:1].islower() or "::" in name or " " in name:  # XLA ops only
      continue
    per_kind[name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1].isdigit() else name] += e.get("dur", 0)
  return {k: round(v / 1e3 / new_tokens, 4) for k, v in per_kind.most_common(8)}


def _run_worker(cmd, env) -> list[dict]:
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
  if out.returncode:
    raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
  return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


def main(argv):
  del argv
  args = flags.FLAGS
  batches = [int(b) for b in args.batches.split(",")]
  if args.worker_ckpt:
    return worker(args.worker_ckpt, batches, args.prompt_len, args.new_tokens, args.profile, args.window_block)
  from tlt_jax.utils.console import say
  os.makedirs(args.out, exist_ok=True)
  contenders = {"tlt_jax": [sys.executable, os.path.abspath(__file__)]}
  envs = {"tlt_jax": dict(os.environ, JAX_PLATFORMS="cpu")}
  contenders["tlt_jax_live"] = contenders["tlt_jax"] + ["--window_block", "32"]
  envs["tlt_jax_live"] = envs["tlt_jax"]
  if args.before:
    contenders["before"] = contenders["tlt_jax"]
    envs["before"] = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.abspath(args.before))
  for peer in (p for p in args.peers.split(",") if p and args.peer_python):
    contenders[peer] = [args.peer_python, os.path.join(ROOT, "scripts", "peer_decode_bench.py"), "--impl", peer]
    envs[peer] = dict(os.environ, JAX_PLATFORMS="cpu")
  _jax()
  from experiments.common import cpu_peak_gflops
  peak0 = cpu_peak_gflops(repeats=10)
  say(f"CPU float32 peak (2048^2 matmul, jax.jit): {peak0:.0f} GFLOP/s")
  common = ["--batches", args.batches, "--prompt_len", str(args.prompt_len), "--new_tokens", str(args.new_tokens)]
  best: dict[tuple, dict] = {}
  infos = {}
  with tempfile.TemporaryDirectory() as tmp:
    for shape in args.shapes.split(","):
      infos[shape] = write_checkpoint(shape, os.path.join(tmp, shape))
    for rep in range(args.repeats):
      for shape in args.shapes.split(","):
        ckpt = os.path.join(tmp, shape)
        for name, cmd in contenders.items():
          own = name in ("tlt_jax", "tlt_jax_live", "before")
          full = cmd + (["--worker_ckpt", ckpt] if own else ["--ckpt", ckpt, "--repeats", "3"]) + common
          if own and args.profile and name == "tlt_jax" and rep == args.repeats - 1:
            full.append("--profile")
          for line in _run_worker(full, envs[name]):
            key, prev = (shape, name, line["batch"]), best.get((shape, name, line["batch"]))
            if prev is not None and "profile_ms_per_step" in prev:
              line.setdefault("profile_ms_per_step", prev["profile_ms_per_step"])
            if prev is None or line["best_s"] < prev["best_s"]:
              best[key] = line
            elif "profile_ms_per_step" in line:
              prev["profile_ms_per_step"] = line["profile_ms_per_step"]
          say(f"repeat {rep + 1}/{args.repeats} shape {shape} {name}: done")
  peak = max(peak0, cpu_peak_gflops(repeats=10))
  rows = []
  for (shape, name, b), line in sorted(best.items()):
    ours = best.get((shape, "tlt_jax", b))
    mine = np.asarray(ours["tokens"]) if ours and "tokens" in ours else None
    theirs = line.get("tokens")
    agree = (float(np.mean(np.asarray(theirs) == mine)) if theirs is not None and mine is not None
             and np.shape(theirs) == mine.shape else None)
    gflops = 2 * infos[shape]["params"] * line["tok_s"] / 1e9
    row = dict(shape=shape, contender=name, batch=b, tok_s=round(line["tok_s"], 1),
               ms_per_step=round(1e3 * line["best_s"] / args.new_tokens, 3), gflops=round(gflops, 2),
               frac_peak=round(gflops / peak, 4), tokens_sha=line["tokens_sha"], agree=agree,
               vs_tlt_jax=round(line["tok_s"] / ours["tok_s"], 3) if ours else None,
               params=infos[shape]["params"], peak_gflops=round(peak, 1), device="cpu (this machine)")
    if "profile_ms_per_step" in line:
      row["profile_ms_per_step"] = line["profile_ms_per_step"]
    rows.append(row)
    print(json.dumps(row), flush=True)
  _write(args.out, rows, infos, peak, args)


def _write(out: str, rows, infos, peak: float, args) -> None:
  output = Output(out)
  output.write_jsonl("decode_bench.jsonl", rows)
  order = ["tlt_jax", "tlt_jax_live", "before", "tunix", "hf"]
  names = sorted(dict.fromkeys(r["contender"] for r in rows), key=lambda n: order.index(n) if n in order else 99)
  md = [f"# Plain greedy decoding on this CPU ({args.prompt_len}-token prompts, {args.new_tokens} new tokens)", "",
        f"CPU float32 peak (2048^2 matmul under jax.jit, this run): {peak:.0f} GFLOP/s. "
        "tok/s of the whole generation (prefill included), best of the alternating runs; "
        "GFLOP/s = 2 x params x tok/s; `x` = tok/s over tlt_jax's; `agree` = tokens equal to tlt_jax's.", "",
        "| shape | params | batch | " + " | ".join(f"{n} tok/s (x, agree)" for n in names) + " | tlt_jax GFLOP/s (% peak) |",
        "|---|---|---|" + "---|" * len(names) + "---|"]
  by = {(r["shape"], r["contender"], r["batch"]): r for r in rows}
  for shape in infos:
    for b in sorted({r["batch"] for r in rows if r["shape"] == shape}):
      cells = []
      for n in names:
        r = by.get((shape, n, b))
        agree = "" if r is None or r["agree"] is None else f", {r['agree']:.2f}"
        cells.append("" if r is None else f"{r['tok_s']:.0f} ({r['vs_tlt_jax']:.2f}x{agree})")
      ours = by.get((shape, "tlt_jax", b))
      md.append(f"| {shape} | {infos[shape]['params'] / 1e6:.2f}M | {b} | " + " | ".join(cells)
                + (f" | {ours['gflops']:.1f} ({100 * ours['frac_peak']:.1f} %) |" if ours else " | |"))
  prof = [r for r in rows if "profile_ms_per_step" in r]
  if prof:
    md += ["", "## Where tlt_jax's decode time goes (ms per step, by XLA op kind, jax.profiler)", "",
           "| shape | batch | ms/step | top op kinds |", "|---|---|---|---|"]
    for r in prof:
      top = ", ".join(f"{k} {v:.3f}" for k, v in r["profile_ms_per_step"].items())
      md.append(f"| {r['shape']} | {r['batch']} | {r['ms_per_step']:.3f} | {top} |")
  output.markdown("decode_bench.md", md)
  fig, axes = pyplot().subplots(1, len(infos), figsize=(4.5 * len(infos), 3.6), squeeze=False)
  for ax, shape in zip(axes[0], infos):
    for n in names:
      pts = sorted((r["batch"], r["tok_s"]) for r in rows if r["shape"] == shape and r["contender"] == n)
      ax.plot(*zip(*pts), marker="o", label=n)
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tok/s", title=f"shape {shape}")
    ax.legend(fontsize=8)
  fig.suptitle("Greedy decode on this CPU (best of alternating runs)")
  fig.tight_layout()
  output.figure(fig, "decode_bench.png", dpi=110)


if __name__ == "__main__":
  run_experiment(main)
