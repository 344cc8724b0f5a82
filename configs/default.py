"""The embedded default: a tiny deep-and-narrow policy on chain-of-thought reversed addition.

Runs end to end on 2 CPU cores in minutes (SFT warm start, EAGLE drafter warm-up, GRPO):
  python -m tlt_jax.main --config=configs/default.py --workdir=runs/default
Override any key: --config.sft.steps=100 --config.model.num_layers=4
"""

import ml_collections


SIZES = ("", "tiny")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The default run; `configs/default.py:tiny` is a seconds-scale variant for tests and notebooks
  (a 2-layer d=32 policy on up to 3-digit sums, few steps, one rollout bucket)."""
  if arg not in SIZES:
    raise ValueError(f"configs/default.py:{arg}: unknown argument {arg!r}; allowed: {SIZES[1:]} "
                     "(or none, for the default)")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "sft,drafter,rl"  # comma-separated subset, in order, of: sft, drafter, rl

  # Policy: 8 layers at d=128 so that one drafter layer costs about 1/8 of a target step.
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0,  # 0: take it from the tokenizer
      hidden_size=128, intermediate_size=384, num_layers=8, num_heads=4, num_kv_heads=2,
      head_dim=0, rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=False,
      tie_word_embeddings=True, max_position_embeddings=256,
      position_embedding="rope",  # or "none" (NoPE: no positional signal but the causal mask)
      param_dtype="float32", dtype="float32",
  ))
  c.init_from = ""  # an HF checkpoint dir (config.json + *.safetensors) to start from

  c.tokenizer = "char"  # "char" (the task's charset) or a tokenizer.json path / dir
  c.task = ml_collections.ConfigDict(dict(name="arith", max_digits=8, alpha=1.5, p_recheck=0.5))
  # A record the run cannot use (a prompt too long for the context, an unparsable file line):
  # "skip" it with a counted warning, or "error" to stop.
  c.data = ml_collections.ConfigDict(dict(on_bad_record="skip"))

  # Mesh ('data', 'fsdp', 'tensor'); -1 fills the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))

  c.sft = ml_collections.ConfigDict(dict(
      # 32 packed rows of 160 tokens (~110 examples) per step; ~1 s/step on 2 CPU cores.
      # 250 steps reach ~0.86 greedy accuracy (300: ~0.91); the RL stage takes it from there.
      steps=250, batch_size=32, max_len=160, lr=3e-3, schedule="wsd", warmup_steps=30,
      decay_frac=0.2, weight_decay=0.01, max_grad_norm=1.0, micro_batches=1,
      # Schedules: constant, cosine, wsd (linear cooldown), wsd_sqrt (1 - sqrt cooldown),
      # wsd_two_stage (the LR drops to stage2_lr_factor * lr at stage2_frac * steps, then cools
      # down over the last decay_frac). lr_from_bound="<schedule>[:<option>=<number>,...]": lr is
      # the LR tuned for that reference and the run uses the bound's transfer of it
      # (train/optim.py:lr_from_config), e.g. "cosine" or "wsd:steps=125".
      stage2_frac=0.4, stage2_lr_factor=0.5, lr_from_bound="",
      eval_every=250, eval_size=256, log_every=25,
  ))
  c.eval = ml_collections.ConfigDict(dict(max_new_tokens=112, batch_size=256, chunk_size=16))

  # Rollouts (RL): sampling from softmax(logits / temperature) restricted to top-k / top-p.
  c.rollout = ml_collections.ConfigDict(dict(
      max_new_tokens=112, chunk_size=16, temperature=1.0, top_p=1.0, top_k=0,
      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),  # active-batch sizes that compile
      # Speculative decoding of a rollout group's tail once its active batch is <= this (TLT).
      # (On 2 CPU cores a speculative round beats plain decoding at best at batch 1-2; BEG-MAB
      # falls back to plain per bucket when it loses, experiments/rollout_speedup.py.)
      spec_threshold=2, rounds_per_chunk=8,
      window_block=0,  # live attention window granularity of a decode chunk (0: the whole cache)
      max_prompt_len=0,  # fixed prompt width - 1 (0: the task's bound or each batch's longest)
  ))

  # EAGLE drafter warm-up on the SFT policy's own features of SFT traces (before RL).
  c.drafter = ml_collections.ConfigDict(dict(
      # 600 steps over the features of 64 batches (~1 min on 2 cores): teacher-forced accuracy
      # 0.94 and accept length 3.1 (d4 chain, T=1), against 0.82 and 2.3 for 200 steps on 16.
      warmup_steps=600, lr=3e-3, batch_size=32, num_batches=64,
      log_every=100,
  ))

  # RL: GRPO on the task's verifier (+ a small format reward), PPO-clip, no KL by default.
  c.rl = ml_collections.ConfigDict(dict(
      steps=25, prompts_per_step=16, group_size=8, advantage="grpo",
      rewards=ml_collections.ConfigDict(dict(verifier=1.0, format=0.1, length_penalty=0.0)),
      reward_kwargs=ml_collections.ConfigDict(dict(
          length_penalty=ml_collections.ConfigDict(dict(alpha=0.1)))),
      num_prompts=100_000,  # size of the TaskSource the prompt iterator walks
      # RL prompts of difficulty >= 2 only (here: >= 2 digits); 1-digit sums are ~100% solved, so
      # their groups have zero advantage and would only cost rollout and update time.
      min_difficulty=2,
      advantage_kwargs=ml_collections.ConfigDict(),  # the estimator's options (rl/advantages.py)
      # Per-token rewards of device scorers (rl/scorers.py): name -> weight (0 = off), e.g.
      # prime (PRIME's implicit PRM, configs/prime.py) or kl (a KL penalty in the reward).
      token_rewards=ml_collections.ConfigDict(dict(prime=0.0, kl=0.0)),
      # Online filters: DAPO's dynamic sampling drops groups whose rewards are all equal; the
      # accuracy band keeps groups whose accuracy is in [lo, hi] (PRIME: (0.2, 0.8)). Dropped
      # groups are replaced by fresh prompts' groups, up to dynamic_sampling_rounds extra rounds.
      dynamic_sampling=False, accuracy_band=(0.0, 1.0), dynamic_sampling_rounds=3,
      loss="ppo_clip",  # the policy loss: ppo_clip, gspo or cispo (rl/losses.py)
      loss_kwargs=ml_collections.ConfigDict(),  # over clip_eps / clip_eps_high / aggregation
      clip_eps=0.2, clip_eps_high=0.0,  # 0: symmetric clipping
      aggregation="token",  # "token" (DAPO) or "sequence" (GRPO)
      kl_coef=0.0,  # > 0 adds k3 KL to the frozen SFT policy (one more forward per step)
      lr=5e-5, schedule="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
      lr_from_bound="",  # as sft.lr_from_bound: '' (off) or the reference schedule rl.lr is tuned for
      micro_batches=1,
      max_consecutive_skips=3,  # stop after this many non-finite (skipped) updates in a row
      # Sequence packing: the update's rows hold several whole (prompt + response) sequences
      # (rl/packing.py), so a long-tailed batch is not padded to its longest response.
      pack=True, pack_rows_multiple=8,  # packed row count: a multiple of this (fewer compiles)
      pack_len=0,  # packed row length (0: prompt width + rollout.max_new_tokens, to length_bucket)
      length_bucket=32,  # update rows (unpacked) are cut to a multiple of this many tokens
      track_kl=True,  # log k3 KL to the SFT policy even when kl_coef = 0 (costs one forward)
      checkpoint_every=10,
      eval_size=256,  # greedy accuracy of the final policy on SFT's eval set (0: off)
      # Sampled accuracy (rollout temperature) on fixed held-out prompts, before RL and every
      # `sample_eval_every` steps: a trend free of the per-step noise of which prompts were drawn.
      sample_eval_every=5, sample_eval_size=256,
  ))

  # TLT: the rollout split over `rollout_groups` slices of the mesh's data axis; each group's
  # tail decoded speculatively (BEG-MAB picks the draft strategy, or plain decoding, per active
  # batch bucket); the drafter trained in the idle groups' bubbles on the policy's own features.
  # On CPU, tlt_jax.main gives the process as many fake devices as there are rollout groups.
  c.tlt = ml_collections.ConfigDict(dict(
      speculative=True,  # the ONE switch for speculative decoding of rollout tails
      train_drafter=True,  # the ONE switch for drafter training in the bubbles (adaptive drafter)
      rollout_groups=2,  # must divide the mesh's data axis
      # Where the drafter trains: "bubbles" (idle groups), "between_steps" (after each update),
      # "auto": bubbles on accelerators, between steps when the groups share a CPU's cores.
      train_where="auto",
      single_group="between_steps",  # with rollout_groups=1: "between_steps" or "off"
      between_steps=4,  # drafter steps after each policy update when it trains between steps
      strategies=("d3k1n3", "d4k1n4", "plain"),  # BEG-MAB arms: d<depth>k<topk>n<verify> or plain
      bandit_epsilon=0.1, bandit_window=16,
      drafter_lr=3e-4,  # constant, Adam; the warm-up's peak drafter.lr overshoots from a trained drafter
      drafter_batch_size=8, buffer_capacity=256, buffer_decay=0.5,  # recency weight per RL step
      max_in_flight=1,  # drafter steps queued at once (the preemption latency at a rollout's end)
      max_drafter_steps=0,  # cap per rollout (0: as many as the bubbles fit)
      buffer_seq_len=0,  # drafter buffer row length (0: the packed update row length)
      buffer_bytes=0,  # host-memory budget of the buffer (0: buffer_capacity rows)
      buffer_dtype="float32",  # the buffered features' dtype: float32 or bfloat16
      checkpoint_buffer=True,  # the buffer's rows go into RL checkpoints
      # Reduced draft vocabulary (EAGLE-3): the drafter proposes among the draft_vocab_size most
      # frequent tokens of the recent rollouts (0: the full vocabulary), recounted every
      # draft_vocab_refresh RL steps with earlier counts weighted by draft_vocab_decay per step.
      # Sampling stays exact either way (the acceptance reads the target alone).
      draft_vocab_size=0, draft_vocab_refresh=1, draft_vocab_decay=0.5,
      # BEG-MAB verify-token ladder: () = every arm in every bucket; else batch-size thresholds,
      # one per num_verify group of the arms (most tokens first), e.g. (1, 2, 5, 21) for arms
      # verifying 48/32/16/8 tokens; plain is an arm in every bucket (tlt/bandit.arm_ladder).
      arm_ladder=(),
  ))

  # async_save: orbax writes a checkpoint in the background while training goes on ("auto": on
  # accelerators; on CPU synchronous). Either way a save that never finished leaves the previous
  # checkpoint restorable.
  c.checkpoint = ml_collections.ConfigDict(dict(every=100, max_to_keep=3, async_save="auto"))
  # Multi-host runs (parallel/hosts.py): a host silent for lost_host_timeout_s is lost and the
  # others exit (status 76) naming it; jax.distributed.shutdown waits shutdown_timeout_s for every
  # host at its barrier.
  c.distributed = ml_collections.ConfigDict(dict(lost_host_timeout_s=120, shutdown_timeout_s=600))

  if arg == "tiny":
    c.model.update(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=128)
    c.task.max_digits = 3
    c.sft.update(steps=40, batch_size=8, max_len=96, warmup_steps=4, eval_every=40, eval_size=8,
                 log_every=20)
    c.eval.max_new_tokens = 48
    c.drafter.update(warmup_steps=4, batch_size=4, num_batches=2, log_every=2)
    c.rollout.update(max_new_tokens=48, buckets=(8,))  # few shapes: few compiles
    c.rl.update(length_bucket=64, steps=4, prompts_per_step=2, group_size=4, lr=3e-3,
                checkpoint_every=1, eval_size=0, sample_eval_every=2, sample_eval_size=8)
  return c
