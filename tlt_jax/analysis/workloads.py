"""Response-length workloads for the step simulator (analysis/sim.py, experiments/pod_sim.py).

A workload draws one RL step's response lengths the way a GRPO batch has them: each prompt gets
its own median (a prompt-level lognormal around the workload's median), then its group's
samples scatter around that (a within-group lognormal), so that a long prompt gives several long
responses at once, the intra-prompt long tail (Wang et al., 2026, "DARTS: Distribution-Aware
Active Rollout Trajectory Shaping for Accelerating LLM Reinforcement Learning", arXiv:2605.30859,
characterises the tail at both levels). The two log-scales add up to the workload's total
`sigma` (sigma^2 = prompt_sigma^2 + within_sigma^2). Lengths are cut at `cap` (a response that
reaches it stops there, as a capped generation does). `drift` > 1 grows the median by that
factor per RL step: reasoning RL lengthens its chains of thought as it trains (DeepSeek-AI,
2025, "DeepSeek-R1", arXiv:2501.12948, Fig. 3: R1-Zero's mean response length grows steadily
over training; the VeRL GRPO replications summarised in
https://zoeyli.com/reinforcement%20learning/research/understanding-length-dynamics/ see
U-shaped or rising lengths).

Presets (`WORKLOADS`):
  base8k     a base model on short math (the earlier pod prediction's case): median 1,500, sigma
             0.7, cap 8,192 (max/median about 5.5, under 1 % at the cap), prompts <= 1,024.
  long_cot   long chain-of-thought reasoning RL as the TLT paper's recipe runs it (responses up to
             32,768 tokens, prompts up to 1,024: github.com/mit-han-lab/fastrl
             examples/grpo_7B.sh): median 3,500, sigma 1.0, cap 32,768: about 1.2 % of the
             responses reach the cap, so the longest of a 512-response batch is the cap, 9.4x the
             median. The median and sigma are the regime's assumption, not a fit to a released
             trace; experiments/pod_sim.py sweeps both and the cap.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
  """Per-step response lengths, drawn per prompt (module docstring)."""

  name: str
  median: float
  sigma: float  # total log-scale spread
  cap: int
  prompt_len: int = 1024
  prompt_share: float = 0.5  # share of sigma^2 that lies between prompts (the rest within a group)
  drift: float = 1.0  # median growth per RL step
  min_len: int = 1

  def __post_init__(self):
    if not (self.median > 0 and self.sigma >= 0 and self.cap >= 1 and 0.0 <= self.prompt_share <= 1.0
            and self.drift > 0):
      raise ValueError(f"workload {self.name!r}: median > 0, sigma >= 0, cap >= 1, prompt_share in "
                       f"[0, 1] and drift > 0 are needed; got {self}")

  @property
  def prompt_sigma(self) -> float:
    return self.sigma * math.sqrt(self.prompt_share)

  @property
  def within_sigma(self) -> float:
    return self.sigma * math.sqrt(1.0 - self.prompt_share)

  def median_at(self, step: int) -> float:
    return self.median * self.drift ** int(step)

  def sample(self, rng: np.random.Generator, prompts: int, group_size: int, step: int = 0) -> np.ndarray:
    """int64[prompts * group_size] lengths, each prompt's group contiguous."""
    mu = np.log(self.median_at(step)) + rng.normal(0.0, self.prompt_sigma, prompts)
    x = np.exp(mu[:, None] + rng.normal(0.0, self.within_sigma, (prompts, group_size)))
    return np.clip(np.round(x), self.min_len, self.cap).astype(np.int64).reshape(-1)

  def replace(self, **kw) -> "Workload":
    return dataclasses.replace(self, **kw)

  def describe(self) -> dict:
    return dataclasses.asdict(self)


WORKLOADS = {
    "base8k": Workload("base8k", median=1500.0, sigma=0.7, cap=8192),
    "long_cot": Workload("long_cot", median=3500.0, sigma=1.0, cap=32768),
}


def workload(name: str, **overrides) -> Workload:
  if name not in WORKLOADS:
    raise ValueError(f"workload {name!r} is not known; allowed: {sorted(WORKLOADS)}")
  return WORKLOADS[name].replace(**overrides) if overrides else WORKLOADS[name]
