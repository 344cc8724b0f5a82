"""The main job: builds everything from a validated config and runs its stages.

Stages (config.stages, in order):
  sft      warm-starts the policy on the task's traces; leaves it in `<workdir>/sft/` (HF layout).
  drafter  warms up an EAGLE drafter on the SFT policy's own features of SFT traces; leaves it
           in `<workdir>/drafter/` (orbax).
  rl       GRPO/RLOO from the SFT policy (rl/trainer.py); checkpoints in `<workdir>/ckpt_rl/`,
           metrics in `<workdir>/metrics.jsonl`, plots `rl_*.png`.
Each stage skips itself when its output exists, and the RL stage resumes from its checkpoint, so
rerunning the same command on the same workdir continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from tlt_jax import config as config_lib
from tlt_jax.data.batching import encode_prompts, make_sft_batch, pack_sft_batch, prompt_check, sft_check
from tlt_jax.data.chat import configure_prompts
from tlt_jax.data.sources import BadRecords, describe_task, usable_draws
from tlt_jax.data.tokenizer import CharTokenizer, load_tokenizer
from tlt_jax.drafter import (collect_target_features, init_drafter, init_drafter_train_state,
                             load_drafter, save_drafter, warmup_drafter)
from tlt_jax.models import hf
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import Transformer
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.parallel.hosts import Preempted, PreemptionWatch
from tlt_jax.errors import CheckpointError, DataError
from tlt_jax.rl.trainer import RLTrainer, rl_context, rl_prompt_sources, round_up
from tlt_jax.rollout.engine import RolloutEngine
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.tlt.groups import split_mesh
from tlt_jax.train import optim
from tlt_jax.train.checkpoint import Checkpointer, async_saves
from tlt_jax.train.sft import run_sft
from tlt_jax.train.state import TrainState, create_train_state
from tlt_jax.utils.console import compact, say, track
from tlt_jax.utils.metrics import MetricsWriter, plot_curves, read_jsonl, writes_outputs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Setup:
  config: Any
  workdir: str
  task: Any
  tokenizer: Any
  model_cfg: ModelConfig
  mesh: Any
  preemption: PreemptionWatch | None = None  # asked once per step boundary by every stage


def check_workdir(workdir: str) -> None:
  """The workdir is a directory, or can be made one: ConfigError otherwise (nothing is created)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"--workdir={workdir!r} is an existing file; allowed: a directory (new, "
                                 "or the workdir of a run to resume)")
  parent = os.path.abspath(workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise config_lib.ConfigError(f"--workdir={workdir!r} cannot be written: {parent!r} is not a writable "
                                 "directory; allowed: a path under a writable directory")


def build_setup(config, workdir: str) -> Setup:
  """Everything a run needs before any work, checked: the workdir, the task and its data, the
  tokenizer, the model (or the `init_from` checkpoint's files), the mesh against the devices, the
  rollout groups, and the RL prompts against the context. Any problem raises ConfigError (one
  line naming the key, the value and what is allowed); nothing is written."""
  check_workdir(workdir)
  task = config_lib.build_task(config)
  if config.tokenizer == "char":
    tokenizer = CharTokenizer(task.charset)
  else:
    try:
      tokenizer = load_tokenizer(config.tokenizer)
    except (OSError, ValueError) as e:
      raise config_lib.ConfigError(f"config.tokenizer={config.tokenizer!r} is not usable: {e}") from None
  try:  # chat template or plain prompts (task option prompt_format)
    configure_prompts(task, tokenizer)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.task.prompt_format: {e}") from None
  mdict = dict(config.model)
  if config.init_from:
    try:
      model_cfg = hf.check_checkpoint(config.init_from).with_execution(dict(config.model))
    except CheckpointError as e:
      raise config_lib.ConfigError(f"config.init_from={config.init_from!r} is not usable: {e}") from None
  else:
    if mdict["vocab_size"] == 0:
      mdict["vocab_size"] = tokenizer.vocab_size
    model_cfg = ModelConfig.from_dict(mdict)
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(f"config.model.vocab_size={model_cfg.vocab_size} is not allowed with this "
                                 f"tokenizer; allowed: 0 (from the tokenizer) or >= its vocabulary "
                                 f"({tokenizer.vocab_size})")
  try:
    mesh = mesh_lib.make_mesh(tuple(config.mesh.shape))
  except ValueError as e:
    raise config_lib.ConfigError(
        f"config.mesh.shape={tuple(config.mesh.shape)} is not allowed: {e}") from None
  stages = config_lib.stages(config)
  if "tlt" in config and "rl" in stages:
    try:  # rollout groups are slices of the data axis
      groups = split_mesh(mesh, config.tlt.rollout_groups)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.{e}") from None
    hosts_of = [{d.process_index for d in g.mesh.devices.flat} for g in groups]
    if any(len(h) < jax.process_count() for h in hosts_of):
      raise config_lib.ConfigError(
          f"config.tlt.rollout_groups={config.tlt.rollout_groups} is not allowed on this mesh: every "
          f"rollout group must span all {jax.process_count()} hosts (every host drives every group), "
          f"but the groups hold the devices of hosts {[sorted(h) for h in hosts_of]}; allowed: fewer "
          "groups (1 always works)")
  if "rl" in stages:
    _check_rl_inputs(config, task, tokenizer, model_cfg, mesh)
  return Setup(config, workdir, task, tokenizer, model_cfg, mesh)


def _check_rl_inputs(config, task, tokenizer, model_cfg: ModelConfig, mesh) -> None:
  """The RL stage's batch shards over the mesh, and its prompt sources yield usable prompts."""
  rl = config.rl
  context = model_cfg.max_position_embeddings
  if config.rollout.max_new_tokens >= context:
    raise config_lib.ConfigError(f"config.rollout.max_new_tokens={config.rollout.max_new_tokens} is not "
                                 f"allowed; allowed: an int < model.max_position_embeddings={context} "
                                 "(the prompt needs room too)")
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = rl.prompts_per_step * rl.group_size // rl.micro_batches
  if not rl.pack and mesh.size > 1 and rows % shards:
    raise config_lib.ConfigError(
        f"config.rl.micro_batches={rl.micro_batches} is not allowed: a micro-batch of {rows} rows "
        f"(rl.prompts_per_step * rl.group_size / rl.micro_batches) does not divide over the mesh's "
        f"data * fsdp = {shards} batch shards; allowed: rows a multiple of {shards}, or rl.pack=True")
  sources = [s for s in rl_prompt_sources(config, task, tokenizer, rl_context(config, model_cfg))
             if s is not None]
  try:
    for source in sources:  # a file task reads its records here; a bad file fails now, not later
      source[0]
  except (DataError, OSError) as e:
    raise config_lib.ConfigError(f"config.task ({describe_task(task)}) cannot feed the RL stage: {e}") from None


def _load_mesh(setup: Setup):
  """The mesh HF weights load straight into (TRAIN_RULES shardings), or None on one device."""
  return setup.mesh if setup.mesh.size > 1 else None


def build_policy(setup: Setup) -> Transformer:
  if setup.config.init_from:
    return hf.from_pretrained(setup.config.init_from, mesh=_load_mesh(setup),
                              execution=dict(setup.config.model))
  return Transformer(setup.model_cfg, rngs=nnx.Rngs(setup.config.seed))


def sft_batches(setup: Setup):
  """batches(step): the SFT batch of `step`, a pure function of (seed, step): `batch_size` rows of
  `max_len` tokens packed with whole examples (no padding waste on the long-tailed lengths)."""
  c = setup.config.sft

  bad = BadRecords(setup.task, setup.config.data.on_bad_record)
  check = sft_check(setup.tokenizer, c.max_len, "sft.max_len")

  def batches(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([setup.config.seed, 1, step])
    draw = usable_draws(lambda: setup.task.sample(rng), check, bad)
    return pack_sft_batch(draw, setup.tokenizer, c.batch_size, c.max_len)

  return batches


def eval_examples(setup: Setup, n: int, seed_offset: int = 7):
  """n fixed held-out examples: task draws whose prompts fit the context beside the evaluation's
  `eval.max_new_tokens` (others are skipped)."""
  rng = np.random.default_rng([setup.config.seed, seed_offset])
  unusable = prompt_check(setup.tokenizer, setup.model_cfg.max_position_embeddings,
                          setup.config.eval.max_new_tokens)
  examples = []
  for _ in range(100 * n):
    if len(examples) == n:
      break
    example = setup.task.sample(rng)
    if unusable(example) is None:
      examples.append(example.with_id(len(examples)))
  return examples


@dataclasses.dataclass(frozen=True)
class Response:
  """One generated response: its text, whether it ended with EOS, its length in tokens, and
  whether the task's verifier accepts it (False when it did not end)."""

  text: str
  finished: bool
  length: int
  correct: bool


def generate_responses(model: Transformer, setup: Setup, examples, max_new_tokens: int, *,
                       temperature: float = 0.0, seed: int = 0, chunk_size: int = 16,
                       batch_size: int = 256, input_embedder=None) -> list[Response]:
  """One response per example from `model` (greedy at temperature 0, else sampled from
  softmax(logits / T) with RNG key `seed`), decoded and verified. `input_embedder`: SCONE's
  f-gram table for a SCONE policy (`scone_rl_policy`), else None."""
  graphdef, params = nnx.split(model)
  engine = RolloutEngine(graphdef, SamplingParams(temperature=float(temperature)),
                         eos_ids=setup.tokenizer.eos_ids, pad_id=setup.tokenizer.pad_id,
                         chunk_size=chunk_size, max_context=setup.model_cfg.max_position_embeddings,
                         input_embedder=input_embedder)
  out = []
  max_prompt = max(len(setup.tokenizer.encode(e.prompt)) for e in examples) + 1
  for i in track(range(0, len(examples), batch_size), "eval", unit="batch",
                 total=-(-len(examples) // batch_size)):
    chunk = examples[i:i + batch_size]
    prompts, plens = encode_prompts(chunk, setup.tokenizer, max_prompt)
    res = engine.generate(params, prompts, plens, max_new_tokens, jax.random.fold_in(jax.random.key(seed), i))
    for j, ex in enumerate(chunk):
      text = setup.tokenizer.decode(res.tokens[j, :res.lengths[j]])
      finished = bool(res.finished[j])
      out.append(Response(text, finished, int(res.lengths[j]), finished and setup.task.verify(text, ex)))
  return out


def evaluate_accuracy(model: Transformer, setup: Setup, examples, max_new_tokens: int,
                      chunk_size: int = 16, batch_size: int = 256, input_embedder=None) -> dict[str, float]:
  """Greedy accuracy (task verifier) and response lengths on `examples`, overall and per
  difficulty (`acc_d<k>`)."""
  responses = generate_responses(model, setup, examples, max_new_tokens, chunk_size=chunk_size,
                                 batch_size=batch_size, input_embedder=input_embedder)
  by_diff = {}
  for ex, r in zip(examples, responses):
    by_diff.setdefault(ex.meta.get("difficulty", 0), []).append(r.correct)
  lengths = [r.length for r in responses]
  out = {"accuracy": float(np.mean([r.correct for r in responses])),
         "response_len_mean": float(np.mean(lengths)), "response_len_max": int(np.max(lengths))}
  for d, oks in sorted(by_diff.items()):
    out[f"acc_d{d}"] = float(np.mean(oks))
  return out


def run_sft_stage(setup: Setup) -> Transformer:
  """SFT with orbax checkpoints every `checkpoint.every` steps; resumes from `<workdir>/ckpt_sft`.
  Leaves the policy in `<workdir>/sft/` (HF safetensors + tokenizer)."""
  c, workdir = setup.config, setup.workdir
  out_dir = os.path.join(workdir, "sft")
  if os.path.exists(os.path.join(out_dir, "config.json")):
    log.info("SFT policy found in %s; skipping SFT", out_dir)
    return hf.from_pretrained(out_dir)
  model = build_policy(setup)
  tx = optim.make_optimizer(c.sft)
  mesh = setup.mesh if setup.mesh.size > 1 else None
  graphdef, params = nnx.split(model)
  state = create_train_state(params, tx, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "ckpt_sft"), c.checkpoint.max_to_keep,
                      async_saves(c.checkpoint.async_save))
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state = restored[1]
    log.info("resumed SFT from step %d", restored[0])
  writer = MetricsWriter(workdir, "sft")
  writer.truncate_after(int(state.step))
  eval_set = eval_examples(setup, c.sft.eval_size)

  def evaluate(m):
    return evaluate_accuracy(m, setup, eval_set, c.eval.max_new_tokens, c.eval.chunk_size, c.eval.batch_size)

  def on_step(st: TrainState):
    step = int(st.step)
    saved = step % c.checkpoint.every == 0 or step == c.sft.steps
    if saved:
      ckpt.save(step, st, {"stage": "sft", "step": step})
    if setup.preemption is not None and setup.preemption.reached():
      if not saved:
        ckpt.save(step, st, {"stage": "sft", "step": step})
      raise Preempted("sft", step, workdir)

  def on_log(step, m):
    writer.write(step, m)
    say(compact("sft", m, ("loss", "token_acc", "grad_norm", "accuracy", "response_len_mean",
                           "time_s"), total=c.sft.steps))

  try:
    model, state, _ = run_sft(model, tx, sft_batches(setup), c.sft.steps, mesh=mesh,
                              micro_batches=c.sft.micro_batches, log_every=c.sft.log_every,
                              on_log=on_log, evaluate=evaluate, eval_every=c.sft.eval_every,
                              state=state, on_step=on_step)
  finally:
    ckpt.close()
    writer.close()
  hf.save_pretrained(model, out_dir)
  if writes_outputs():
    setup.tokenizer.save(out_dir)
  records = read_jsonl(writer.path)
  plot_curves(records, ["loss", "token_acc", "accuracy"], os.path.join(workdir, "sft.png"), "SFT")
  return model


def load_policy(setup: Setup) -> Transformer:
  """The SFT policy of `<workdir>/sft/` when present, else the initial policy."""
  sft_dir = os.path.join(setup.workdir, "sft")
  if os.path.exists(os.path.join(sft_dir, "config.json")):
    return hf.from_pretrained(sft_dir, execution=dict(setup.config.model))
  log.warning("no SFT policy in %s; later stages start from the initial policy", sft_dir)
  return build_policy(setup)


def drafter_batches(setup: Setup, target: Transformer):
  """`drafter.num_batches` batches of SFT traces (one example a row), each with the target's
  features, cycled forever: warm-up steps then cost one drafter layer, not a target forward.

  The drafter's loss_mask[t] marks rows whose NEXT token is a response token (drafter/train.py),
  i.e. the SFT target mask shifted left by one.
  """
  c = setup.config.drafter
  rng = np.random.default_rng([setup.config.seed, 3])
  context = setup.model_cfg.max_position_embeddings
  draw = usable_draws(lambda: setup.task.sample(rng),
                      sft_check(setup.tokenizer, context, "model.max_position_embeddings"),
                      BadRecords(setup.task, setup.config.data.on_bad_record))
  pool = []
  for _ in track(range(c.num_batches), "features", unit="batch"):
    examples = [draw() for _ in range(c.batch_size)]
    longest = max(len(setup.tokenizer.encode(e.prompt)) + len(setup.tokenizer.encode(e.trace)) + 2
                  for e in examples)
    batch = make_sft_batch(examples, setup.tokenizer, round_up(longest, 16))
    loss_mask = np.zeros_like(batch["loss_mask"])
    loss_mask[:, :-1] = batch["loss_mask"][:, 1:]
    hidden = collect_target_features(target, batch["tokens"])
    pool.append({"tokens": batch["tokens"], "loss_mask": loss_mask, "hidden": hidden})
  return itertools.cycle(pool)


def run_drafter_stage(setup: Setup, policy: Transformer):
  """EAGLE drafter warm-up on the SFT policy's features; saved to `<workdir>/drafter/`."""
  c = setup.config.drafter
  out_dir = os.path.join(setup.workdir, "drafter")
  loaded = load_drafter(out_dir, policy.cfg)
  if loaded is not None:
    log.info("drafter found in %s; skipping its warm-up", out_dir)
    return loaded[0]
  drafter = init_drafter(policy.cfg, seed=setup.config.seed + 1)
  tx = optim.make_optimizer(dict(lr=c.lr, steps=c.warmup_steps, schedule="cosine",
                                 warmup_steps=min(20, c.warmup_steps - 1), final_lr=0.1 * c.lr))
  writer = MetricsWriter(setup.workdir, "drafter")
  writer.truncate_after(0)

  def on_log(record):
    writer.write(record["step"], record)
    say(compact("drafter", record, ("loss", "smooth_l1", "ce", "accuracy"), total=c.warmup_steps))

  def on_step(step):
    if setup.preemption is not None and setup.preemption.reached():
      raise Preempted("drafter", step, setup.workdir)

  try:
    drafter, history = warmup_drafter(policy, drafter, drafter_batches(setup, policy), c.warmup_steps,
                                      tx, log_every=c.log_every, on_log=on_log, on_step=on_step)
  finally:
    writer.close()
  save_drafter(drafter, out_dir, c.warmup_steps,
               {"stage": "drafter", "steps": c.warmup_steps, "final": history[-1] if history else {},
                "target": os.path.join(setup.workdir, "sft")})
  return drafter


def drafter_bundle(config, drafter):
  """(graphdef, DrafterTrainState, optimizer) of the warmed-up drafter for the RL stage (its
  training in TLT's bubbles runs at `tlt.drafter_lr`, constant), or None without a drafter."""
  if drafter is None:
    return None
  lr = config.tlt.drafter_lr if "tlt" in config else config.drafter.lr
  drafter_tx = optim.make_optimizer(dict(lr=lr, steps=max(config.rl.steps, 1), schedule="constant"))
  return nnx.graphdef(drafter), init_drafter_train_state(drafter, drafter_tx), drafter_tx


def scone_rl_policy(setup: Setup):
  """(main transformer, f-gram table) of the SCONE policy named by `config.scone.checkpoint` (a
  directory of `models/scone.py` `save_checkpoint`, with the model and `scone` sections of
  configs/scone.py in its meta), or None when the config has no SCONE checkpoint."""
  c = setup.config
  if "scone" not in c or not c.scone.get("checkpoint", ""):
    return None
  from tlt_jax.models import scone as scone_lib
  try:
    model, vocab, _ = scone_lib.load_checkpoint(str(c.scone.checkpoint))
  except CheckpointError as e:
    raise config_lib.ConfigError(f"config.scone.checkpoint={c.scone.checkpoint!r} is not usable: {e}") from None
  if model.cfg.vocab_size < setup.tokenizer.vocab_size:
    raise config_lib.ConfigError(
        f"config.scone.checkpoint={c.scone.checkpoint!r} holds a model of vocab_size {model.cfg.vocab_size}; "
        f"allowed: one at least the tokenizer's ({setup.tokenizer.vocab_size})")
  return scone_lib.rl_policy(model, vocab)


def run_rl_stage(setup: Setup, policy: Transformer, drafter=None, input_embedder=None) -> dict[str, Any]:
  """GRPO/RLOO from `policy` (the SFT model, also the frozen KL reference); resumes from
  `<workdir>/ckpt_rl`. `input_embedder`: the f-gram table of a SCONE policy (`scone_rl_policy`)."""
  c = setup.config
  reference_params = jax.tree.map(lambda x: x.copy(), nnx.state(policy))
  bundle = drafter_bundle(c, drafter)
  eval_set = eval_examples(setup, c.rl.eval_size) if c.rl.eval_size else []

  def evaluate(model):
    return evaluate_accuracy(model, setup, eval_set, c.eval.max_new_tokens, c.eval.chunk_size,
                             c.eval.batch_size, input_embedder=input_embedder)

  trainer = RLTrainer(c, setup.task, setup.tokenizer, policy, setup.workdir, mesh=setup.mesh,
                      reference_params=reference_params,
                      reference_source=os.path.join(setup.workdir, "sft"), drafter=bundle,
                      evaluate=evaluate, preemption=setup.preemption, input_embedder=input_embedder)
  return trainer.run()


class Interrupted(Exception):
  """SIGINT (Ctrl-C) during a stage: what was saved stays, and the same command resumes."""

  def __init__(self, stage: str, workdir: str):
    self.stage, self.workdir = stage, workdir
    resume = {"sft": f"SFT resumes from its last checkpoint in {os.path.join(workdir, 'ckpt_sft')}",
              "drafter": "the drafter warm-up restarts (it takes about a minute)",
              "rl": f"RL resumes from its last checkpoint in {os.path.join(workdir, 'ckpt_rl')}"}[stage]
    super().__init__(f"interrupted during the {stage} stage; everything saved in {workdir} is kept. "
                     f"Rerun the same command to continue: {resume}.")


def write_config(config, workdir: str) -> None:
  """`<workdir>/config.json`, written atomically; a different earlier one is kept as
  `config.<k>.json` (a run's record of how it was made is never lost)."""
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == text:
      return
    k = 1
    while os.path.exists(os.path.join(workdir, f"config.{k}.json")):
      k += 1
    os.replace(path, os.path.join(workdir, f"config.{k}.json"))
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def describe_outputs(config, workdir: str) -> str:
  """Where a run's outputs go, for the first lines of the console."""
  stages = config_lib.stages(config)
  parts = [f"outputs in {workdir}/:"]
  if "sft" in stages:
    parts.append("sft/ (policy, HF safetensors), ckpt_sft/, sft.jsonl, sft.png")
  if "drafter" in stages:
    parts.append("drafter/ (orbax), drafter.jsonl")
  if "rl" in stages:
    parts.append("ckpt_rl/ (orbax), metrics.jsonl, rl_eval.jsonl, rl_*.png")
  parts.append(f"summary.json; TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tb')}")
  return " ".join(parts[:1]) + " " + "; ".join(parts[1:])


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the configured stages; returns a summary dict.

  Every input is checked first (`config_lib.finalize`, `build_setup`); only then is anything
  written to `workdir`. Ctrl-C in a stage raises `Interrupted` once the stage's own clean-up
  (closing checkpoints and metrics) is done. SIGTERM makes the running stage save at its next step
  boundary (the same one on every host) and raise `hosts.Preempted`.
  """
  config = config_lib.finalize(config)
  setup = build_setup(config, workdir)
  setup.preemption = PreemptionWatch()
  os.makedirs(workdir, exist_ok=True)
  if writes_outputs():
    write_config(config, workdir)
  say(describe_outputs(config, workdir))
  summary: dict[str, Any] = {"workdir": workdir, "params": setup.model_cfg.num_params}
  t0 = time.perf_counter()
  model, drafter = None, None
  for stage in config_lib.stages(config):
    t_stage = time.perf_counter()
    try:
      if stage == "sft":
        model = run_sft_stage(setup)
      elif stage == "drafter":
        model = model or load_policy(setup)
        drafter = run_drafter_stage(setup, model)
      elif stage == "rl":
        scone_policy = scone_rl_policy(setup)  # config.scone.checkpoint: a SCONE policy instead
        embedder = None
        if scone_policy is not None:
          model, embedder = scone_policy
        model = model or load_policy(setup)
        if drafter is None:  # a drafter made earlier on this workdir joins the RL state
          loaded = load_drafter(os.path.join(workdir, "drafter"), model.cfg)
          drafter = loaded[0] if loaded is not None else None
        summary["rl"] = run_rl_stage(setup, model, drafter, input_embedder=embedder)
    except KeyboardInterrupt:
      setup.preemption.close()
      raise Interrupted(stage, workdir) from None
    except BaseException:
      setup.preemption.close()
      raise
    summary[f"{stage}_time_s"] = time.perf_counter() - t_stage
    say(f"{stage} stage done in {summary[f'{stage}_time_s']:.0f} s")
  setup.preemption.close()
  summary["total_time_s"] = time.perf_counter() - t0
  if writes_outputs():
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
