"""RooflineCosts charges each part of a speculative round as the program runs it: the drafter's
own one-layer KV over the live window, the head rows of the draft vocabulary per draft level, the
verify's n + 1 tokens. Every term is pinned on a hand-computable config."""

import pytest

from tlt_jax.analysis.costs import DECODE_EFFICIENCY, H100, PAPER_LAYOUT, RooflineCosts


def _costs(**kw):
  # bandwidth 1 byte/s at efficiency 1: a memory-bound term's seconds are its bytes per chip
  base = dict(params=1000, layers=4, kv_heads=2, head_dim=8, group_chips=2, total_chips=4,
              hbm_bandwidth=1.0, peak_flops=1e30, drafter_params=100, vocab_size=50, hidden_size=10,
              bytes_per_param=2, mfu=1.0, decode_efficiency=1.0)
  base.update(kw)
  return RooflineCosts(**base)


def test_each_term_of_a_round():
  c = _costs()
  b, ctx = 3, 7
  # KV per layer per row per slot: 2 (k, v) x 2 heads x 8 dims x 2 bytes = 64 bytes
  assert c._kv_bytes(b, ctx) == 64 * 4 * b * ctx
  assert c.drafter_kv_bytes(b, ctx) == 64 * 1 * b * ctx  # the drafter's ONE layer, not the target's 4
  assert c.draft_head_bytes() == 50 * 10 * 2  # every head row
  t = c.spec_round_terms(b, (4, 2, 5), ctx)
  dkv = 64 * b * ctx
  assert t["catchup"] == pytest.approx((100 * 2 + dkv) / 2)  # per chip of the 2
  assert t["draft_heads"] == pytest.approx(4 * 1000 / 2)  # d = 4 head reads of 1,000 bytes
  assert t["draft_levels"] == pytest.approx(3 * (100 * 2 + dkv) / 2)  # d - 1 drafter calls
  assert t["verify"] == pytest.approx((1000 * 2 + 64 * 4 * b * ctx) / 2)
  assert c.spec_round(b, (4, 2, 5), ctx) == pytest.approx(sum(t.values()))
  assert c.decode_step(b, ctx) == pytest.approx(t["verify"])  # memory-bound: verify reads what decode does


def test_reduced_draft_vocab_reads_its_rows_only():
  full, small = _costs(), _costs(draft_vocab=5)
  assert small.draft_head_bytes() == 5 * 10 * 2
  tf, ts = full.spec_round_terms(1, (3, 1, 3), 4), small.spec_round_terms(1, (3, 1, 3), 4)
  assert ts["draft_heads"] == pytest.approx(tf["draft_heads"] / 10)
  assert ts["verify"] == tf["verify"] and ts["catchup"] == tf["catchup"]


def test_verify_tokens_become_compute_bound():
  """At a large enough batch the verify's 2 x params x (n + 1) FLOPs per row dominate its bytes."""
  c = _costs(peak_flops=1000.0, hbm_bandwidth=1e6)
  b, n = 64, 7
  flops_s = 2.0 * 1000 * b * (n + 1) / 2 / 1000.0
  assert c.spec_round_terms(b, (2, 1, n), 1)["verify"] == pytest.approx(flops_s)
  assert c.decode_step(b, 1) == pytest.approx(2.0 * 1000 * b / 2 / 1000.0)


def test_drafter_window_cost_grows_with_live_context_by_one_layer():
  c = _costs()
  d0, d1 = c.spec_round_terms(2, (3, 1, 3), 100), c.spec_round_terms(2, (3, 1, 3), 200)
  # 100 more slots x 2 rows x 64 bytes (one layer) per drafter call, per chip of 2
  assert d1["catchup"] - d0["catchup"] == pytest.approx(100 * 2 * 64 / 2)
  assert d1["draft_levels"] - d0["draft_levels"] == pytest.approx(2 * 100 * 2 * 64 / 2)
  assert d1["verify"] - d0["verify"] == pytest.approx(4 * 100 * 2 * 64 / 2)  # the target's 4 layers


def test_presets_are_the_cited_figures():
  assert (H100.hbm_bandwidth, H100.peak_flops) == (3.35e12, 989e12)
  assert PAPER_LAYOUT["group_chips"] == 4 and PAPER_LAYOUT["spec_threshold"] == 32
  assert [a[2] for a in PAPER_LAYOUT["arms"]] == [48, 32, 16, 8]
  assert all(a[0] * a[1] >= a[2] for a in PAPER_LAYOUT["arms"])
  assert 0.5 < DECODE_EFFICIENCY < 0.9


# ------------------------------------------------------------------ compiled costs from JSONL


def _jsonl(path, *records):
  import json
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _row(step, ms, optimal=None):
  return {"step": step, "hbm_roofline_s": ms * 1e-3, "optimal_seconds": float("nan") if optimal is None else optimal}


def _compiled(paths):
  from tlt_jax.analysis.costs import CompiledCosts
  base = dict(params=1000, layers=4, kv_heads=2, head_dim=8, group_chips=2, total_chips=4,
              hbm_bandwidth=1.0, peak_flops=1e30)
  return CompiledCosts.from_jsonl(paths, **base)


def test_compiled_files_merge_the_last_file_wins(tmp_path):
  """Several pod_compile JSONL files: a step held by two is taken from the later one; steps held
  by one file only come from it; the comma-separated string and the list read the same."""
  layout = {"layout": {"topology": "v5p-64", "capacity": 100}}
  old = _jsonl(tmp_path / "old.jsonl", layout, _row("decode_chunk@1", 2.0), _row("speculative_chunk[d4k1n4]@1", 9.0),
               _row("speculative_chunk[d4k1n4]@8", 12.0))
  new = _jsonl(tmp_path / "new.jsonl", layout, _row("speculative_chunk[d4k1n4]@1", 5.0))
  c = _compiled(f"{old},{new}")
  assert c.spec_round(1, (4, 1, 4), 100) == pytest.approx(5e-3)  # the later file's row
  assert c.spec_round(8, (4, 1, 4), 100) == pytest.approx(12e-3)  # only the earlier file has it
  assert c.decode_step(1, 100) == pytest.approx(2e-3)
  assert c.origin["speculative_chunk[d4k1n4]@1"] == new and c.origin["decode_chunk@1"] == old
  assert c.capacity == 100
  # the other order: the earlier design's row wins
  assert _compiled([new, old]).spec_round(1, (4, 1, 4), 100) == pytest.approx(9e-3)
  # a program with no row falls back to the roofline, and `uses` says so
  roof = RooflineCosts(params=1000, layers=4, kv_heads=2, head_dim=8, group_chips=2, total_chips=4,
                       hbm_bandwidth=1.0, peak_flops=1e30)
  assert c.spec_round(1, (3, 1, 3), 100) == pytest.approx(roof.spec_round(1, (3, 1, 3), 100))
  uses = {u["unit"]: u for u in c.uses([(3, 1, 3)])}
  assert uses["round d3k1n3"]["source"] == "roofline" and uses["decode step"]["file"] == "old.jsonl"


def test_compiled_files_missing_or_of_other_layouts_are_config_errors(tmp_path):
  from tlt_jax.errors import ConfigError
  a = _jsonl(tmp_path / "a.jsonl", {"layout": {"topology": "v5p-64", "capacity": 100}}, _row("decode_chunk@1", 1.0))
  b = _jsonl(tmp_path / "b.jsonl", {"layout": {"topology": "v5p-64", "capacity": 200}}, _row("decode_chunk@2", 1.0))
  with pytest.raises(ConfigError, match="missing.jsonl cannot be read"):
    _compiled(f"{a},{tmp_path / 'missing.jsonl'}")
  with pytest.raises(ConfigError, match="capacity=200"):
    _compiled([a, b])


def test_compiled_live_context_scale_is_per_batch(tmp_path):
  """A whole-cache program scaled to the live context by the decode_step windows of ITS batch
  (interpolated between compiled batches), the whole cache counted at the layout's capacity."""
  rows = [{"layout": {"capacity": 1000}},
          _row("decode_chunk@1", 10.0), _row("decode_chunk@8", 40.0), _row("speculative_chunk[d3k1n3]@8", 80.0),
          _row("decode_step@1", 10.0), _row("decode_step@1,window=100", 9.0),
          _row("decode_step@8", 40.0), _row("decode_step@8,window=100", 10.0), _row("decode_step@8,window=500", 25.0)]
  c = _compiled(_jsonl(tmp_path / "w.jsonl", *rows))
  assert c.ctx_scale(1, 100) == pytest.approx(0.9)
  assert c.ctx_scale(8, 100) == pytest.approx(0.25)
  assert c.ctx_scale(8, 750) == pytest.approx((25 + 15 / 2) / 40)  # between 500 and the whole cache at 1000
  assert c.ctx_scale(8, 1000) == pytest.approx(1.0)
  assert c.ctx_scale(4.5, 100) == pytest.approx((0.9 + 0.25) / 2)  # halfway between batches 1 and 8
  assert c.ctx_scale(64, 100) == pytest.approx(0.25)  # the nearest batch beyond the ends
  assert c.decode_step(8, 100) == pytest.approx(10e-3)
  assert c.spec_round(8, (3, 1, 3), 100) == pytest.approx(20e-3)  # same scale: 2 decode steps at any context
  # the compiler's optimal_seconds, where it gives one, is the program's time
  c2 = _compiled(_jsonl(tmp_path / "o.jsonl", _row("decode_chunk@1", 10.0, optimal=0.012)))
  assert c2.decode_step(1, 5) == pytest.approx(0.012)


def test_compiled_round_kv_rule_shrinks_only_a_decode_steps_worth(tmp_path):
  """round_ctx="kv": a whole-cache round loses what a decode step loses at the live window, the
  rest of it stays (80 - 40 x (1 - 0.25) = 50 ms at a window of 100 of batch 8)."""
  rows = [_row("decode_chunk@8", 40.0), _row("speculative_chunk[d3k1n3]@8", 80.0),
          _row("decode_step@8", 40.0), _row("decode_step@8,window=100", 10.0)]
  c = _compiled(_jsonl(tmp_path / "k.jsonl", *rows))
  kv = type(c)(**{**{f: getattr(c, f) for f in c.__dataclass_fields__}, "round_ctx": "kv"})
  assert kv.spec_round(8, (3, 1, 3), 100) == pytest.approx(50e-3)
  assert c.spec_round(8, (3, 1, 3), 100) == pytest.approx(20e-3)
  assert kv.decode_step(8, 100) == c.decode_step(8, 100) == pytest.approx(10e-3)
