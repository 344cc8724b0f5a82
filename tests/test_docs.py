"""The documentation is true: the extending guide's examples run and register working things, the
README stays short, relative links resolve, and no text speaks of how the code was developed."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import subprocess
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# docs/extending.md: every ```python block runs, in order, in one namespace.


def python_blocks(path: pathlib.Path) -> list[str]:
  """The bodies of the fenced ```python blocks of a markdown file, in order."""
  return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def _registries():
  """The registries the extending guide adds to."""
  from tlt_jax.data.tasks import base as tasks_base
  from tlt_jax.rl import advantages, losses, rewards, scorers
  from tlt_jax.train import optim
  return [tasks_base._TASKS, rewards._REWARDS, advantages._ADVANTAGES, losses._LOSSES, scorers._SCORERS,
          optim._SCHEDULES]


@contextlib.contextmanager
def extending_namespace():
  """The namespace after executing docs/extending.md's python blocks (from the repository root,
  as a reader would). On exit the names the examples registered are removed again, so that other
  tests in the same process see only the library's names."""
  blocks = python_blocks(ROOT / "docs" / "extending.md")
  assert len(blocks) >= 7, f"expected the six examples and the config, found {len(blocks)} blocks"
  namespace: dict = {"__name__": "docs_extending"}
  cwd = os.getcwd()
  try:
    os.chdir(ROOT)
    try:
      for i, block in enumerate(blocks):
        exec(compile(block, f"docs/extending.md[python block {i}]", "exec"), namespace)  # noqa: S102
    finally:
      os.chdir(cwd)
    yield namespace
  finally:  # unregister what the examples defined (library modules imported meanwhile stay)
    for registry in _registries():
      for name, obj in list(registry._items.items()):
        if getattr(obj, "__module__", None) == namespace["__name__"]:
          del registry._items[name]


@pytest.fixture
def extending():
  with extending_namespace() as namespace:
    yield namespace


EXAMPLE_NAMES = {"parity", "brevity", "median_baseline", "reinforce", "surprisal", "inverse_sqrt"}


def test_extending_examples_are_unregistered_afterwards():
  def names():
    return {n for registry in _registries() for n in registry.names()}
  with extending_namespace():
    assert EXAMPLE_NAMES <= names()
  assert not EXAMPLE_NAMES & names()


def test_extending_task_is_registered_and_consistent(extending):
  from tlt_jax.data.tasks import get_task, registered_tasks
  assert "parity" in registered_tasks()
  task = get_task("parity", max_bits=5)
  rng = np.random.default_rng(0)
  for _ in range(64):
    ex = task.sample(rng)
    bits = ex.prompt[:-1]
    assert 2 <= len(bits) <= 5 and ex.meta["difficulty"] == len(bits)
    assert ex.answer == ("E" if bits.count("1") % 2 == 0 else "O")
    assert task.verify(ex.trace, ex)  # the SFT trace is a correct response
    assert set(ex.prompt + ex.trace) <= set(task.charset)
  assert task.extract_answer("1+1=2;A:E") == "E" and task.extract_answer("1+1=2;") is None
  with pytest.raises(ValueError, match="no option"):
    get_task("parity", max_digits=3)


def test_extending_reward_scores_a_group(extending):
  from tlt_jax.data.tasks import Example, get_task
  from tlt_jax.rl.rewards import combine_rewards, get_reward
  task = get_task("parity")
  ex = Example(prompt="101=", trace="1+0+1=2;A:E", answer="E", meta={"difficulty": 3})
  responses = ["1+0+1=2;A:E", "1+0+1=2;A:O", "A:E", "1+0+1=2;A:E"]
  finished, lengths = [True, True, True, False], [12, 12, 3, 12]
  got = get_reward("brevity", max_len=16)(responses, finished, lengths, ex, task)
  np.testing.assert_allclose(got, [1 - 12 / 16, 0.0, 1 - 3 / 16, 0.0], rtol=1e-6)
  both = combine_rewards({"verifier": 1.0, "brevity": 0.5}, {"brevity": {"max_len": 16}})
  np.testing.assert_allclose(both(responses, finished, lengths, ex, task),
                             [1 + 0.5 * 0.25, 0.0, 1 + 0.5 * (13 / 16), 0.0], rtol=1e-6)


def test_extending_advantage_gives_the_expected_numbers(extending):
  from tlt_jax.rl.advantages import AdvantageInputs, get_advantage, token_advantages
  rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.2, 0.4, 0.9, 0.3]])
  got = get_advantage("median_baseline", scale=2.0)(rewards)
  expected = 2.0 * np.array([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 1.0], [-0.15, 0.05, 0.55, -0.05]])
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
  mask = jnp.ones((3, 4, 5)).at[:, :, 3:].set(0.0)
  per_token = token_advantages("median_baseline", scale=2.0)(AdvantageInputs(rewards, jnp.zeros_like(mask), mask))
  np.testing.assert_allclose(np.asarray(per_token[:, :, 0]), expected, rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(per_token[:, :, 3:]) == 0.0)


def test_extending_loss_matches_numpy_and_ppo_on_policy(extending):
  from tlt_jax.rl.losses import get_loss
  rng = np.random.default_rng(0)
  logp = jnp.asarray(-rng.uniform(0.1, 3.0, (3, 6)), jnp.float32)
  mask = jnp.asarray([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], jnp.float32)
  adv = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
  reinforce = get_loss("reinforce")
  loss, metrics = reinforce(logp, logp, adv, mask)
  m = np.asarray(mask)
  expected = np.sum(-np.asarray(adv)[:, None] * np.asarray(logp) * m) / m.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  assert float(metrics["ratio_mean"]) == pytest.approx(1.0) and float(metrics["approx_kl"]) == pytest.approx(0.0)
  # On-policy (old = new), REINFORCE's gradient is PPO-clip's, for both aggregations.
  for aggregation in ("token", "sequence"):
    g_new = jax.grad(lambda x: reinforce(x, logp, adv, mask, aggregation=aggregation)[0])(logp)
    g_ppo = jax.grad(lambda x: get_loss("ppo_clip")(x, logp, adv, mask, aggregation=aggregation)[0])(logp)
    np.testing.assert_allclose(np.asarray(g_new), np.asarray(g_ppo), rtol=1e-5, atol=1e-7)


def test_extending_loss_runs_in_the_policy_update(extending):
  """The update step calls the new loss like the built-in ones: on-policy, one step of REINFORCE
  and one of PPO-clip from the same params land on the same params."""
  import optax
  from flax import nnx
  from tlt_jax.models.config import ModelConfig
  from tlt_jax.models.transformer import init_model
  from tlt_jax.rl.update import UpdateConfig, make_logprob_fn, make_policy_update_step
  from tlt_jax.train.state import create_train_state
  cfg = ModelConfig(vocab_size=24, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=1)
  graphdef, params = nnx.split(init_model(cfg, seed=0))
  b, length = 4, 8
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, cfg.vocab_size, (b, length)).astype(np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
  segments = np.ones((b, length), np.int32)
  mask = (np.arange(length)[None] >= 3).astype(np.float32).repeat(b, 0)
  logp, _ = make_logprob_fn(graphdef, 1.0)(params, tokens, positions, segments, mask, np.zeros((b, length), np.float32))
  batch = dict(tokens=tokens, positions=positions, segment_ids=segments, response_mask=mask,
               advantages=np.broadcast_to(rng.normal(0, 1, (b, 1)), (b, length)).astype(np.float32),
               old_logprobs=np.asarray(logp, np.float32))
  tx = optax.sgd(0.1)
  out = {}
  for loss in ("reinforce", "ppo_clip"):
    state = create_train_state(jax.tree.map(jnp.copy, params), tx, None)
    step = make_policy_update_step(graphdef, tx, UpdateConfig(loss=loss), state, None, with_ref=False)
    state, metrics, _ = step(state, dict(batch))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0.0
    out[loss] = jax.device_get(state.params)
  for a, c in zip(jax.tree.leaves(out["reinforce"]), jax.tree.leaves(out["ppo_clip"])):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_extending_device_scorer(extending):
  import ml_collections
  from tlt_jax.rl.scorers import ScorerContext, build_scorers, registered_scorers
  assert "surprisal" in registered_scorers()
  ctx = ScorerContext(graphdef=None, policy_params=None, ref_params=None, mesh=None, temperature=1.0,
                      logprob_fn=None)
  config = ml_collections.ConfigDict(dict(rl=dict(token_rewards=dict(surprisal=0.01, kl=0.0))))
  (weight, scorer), = build_scorers(config, ctx).values()
  assert weight == 0.01
  old = jnp.asarray([[-0.5, -2.0, -1.0], [-3.0, -0.1, -0.2]], jnp.float32)
  mask = jnp.asarray([[0, 1, 1], [1, 1, 0]], jnp.float32)
  rewards, metrics = scorer.score(types.SimpleNamespace(device={"old_logprobs": old, "response_mask": mask}), None)
  np.testing.assert_allclose(np.asarray(rewards), [[0.0, 2.0, 1.0], [3.0, 0.1, 0.0]], rtol=1e-6)
  assert metrics["surprisal_mean"] == pytest.approx((2.0 + 1.0 + 3.0 + 0.1) / 4)


def test_extending_schedule_values(extending):
  from tlt_jax.train.optim import make_schedule, registered_schedules
  assert "inverse_sqrt" in registered_schedules()
  schedule = make_schedule("inverse_sqrt", 1.0, 100, 4)
  got = [float(schedule(t)) for t in (0, 2, 4, 16, 64)]
  np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.5, 0.25], rtol=1e-6)


def test_extending_config_validates_and_refuses_a_bad_name(extending):
  from tlt_jax import config as config_lib
  config = extending["config"]
  assert config.task.name == "parity" and config.rl.loss == "reinforce"
  config_lib.validate(config)
  config.rl.token_rewards.surprisal = 0.01
  with pytest.raises(config_lib.ConfigError, match="token estimator"):
    config_lib.validate(config)
  config.rl.advantage = "rloo_returns"
  with pytest.raises(config_lib.ConfigError, match="scale"):  # median_baseline's option
    config_lib.validate(config)
  del config.rl.advantage_kwargs["scale"]
  config_lib.validate(config)
  config.rl.advantage = "median"
  with pytest.raises(config_lib.ConfigError, match="median_baseline"):
    config_lib.validate(config)


# ---------------------------------------------------------------------------------------------
# README length, links, machine-local paths.


def test_readme_is_short():
  words = len((ROOT / "README.md").read_text().split())
  assert words <= 1600, f"README.md has {words} words; keep it under about 1,500 (details go to docs/)"


README_COMMANDS = (
    "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/python -m tlt_jax.main "
    "--config=configs/default.py --workdir=runs/default",
    'python3 -m venv .venv && .venv/bin/pip install -q -e ".[tpu,test]" && .venv/bin/python -m pytest -q -n 2 tests',
)


def test_readme_gives_the_two_commands():
  readme = (ROOT / "README.md").read_text()
  for command in README_COMMANDS:
    assert command in readme, f"README.md lacks the command {command!r}"
  assert ".ci/run" in readme


# Pages that other changes add; a link to one of them may dangle until it lands. Remove each entry
# once its page exists.
PAGES_ADDED_SEPARATELY: set[str] = set()  # pages a link may name before they exist


def _relative_links(path: pathlib.Path) -> list[tuple[int, str]]:
  links = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    for target in re.findall(r"\]\(([^)\s]+)\)", line):
      if re.match(r"^[a-z]+:", target) or target.startswith("#"):
        continue
      links.append((i, target.split("#", 1)[0]))
  return links


def test_relative_links_resolve():
  pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
           *sorted((ROOT / "experiments" / "results").rglob("*.md"))]
  missing = []
  for page in pages:
    for line, target in _relative_links(page):
      resolved = (page.parent / target).resolve()
      rel = os.path.relpath(resolved, ROOT)
      if not resolved.exists() and rel not in PAGES_ADDED_SEPARATELY:
        missing.append(f"{page.relative_to(ROOT)}:{line}: {target}")
  assert not missing, "links to missing files:\n" + "\n".join(missing)


def test_docs_index_lists_every_page():
  index = (ROOT / "docs" / "index.md").read_text()
  listed = {os.path.relpath((ROOT / "docs" / t).resolve(), ROOT) for _, t in _relative_links(ROOT / "docs" / "index.md")}
  pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md") if p.name != "index.md"}
  assert not pages - listed, f"docs/index.md does not list {sorted(pages - listed)}"
  assert index.strip()


def _tracked_files() -> list[str]:
  try:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  return out.splitlines()


def test_results_markdown_has_no_machine_local_paths():
  bad = []
  for name in _tracked_files():
    if name.startswith("experiments/results/") and name.endswith(".md"):
      for i, line in enumerate((ROOT / name).read_text().splitlines(), 1):
        if re.search(r"(?<![\w.])/(tmp|work)/", line):
          bad.append(f"{name}:{i}: {line.strip()[:100]}")
  assert not bad, "machine-local paths in results:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# No development narrative: the project speaks of itself, not of the history of its making.

DEVELOPMENT_WORDS = [
    re.compile(r"\bsession [0-9]", re.I),
    re.compile(r"\bsessions? \d", re.I),
    re.compile(r"was[ ]lent", re.I),
    re.compile(r"\blent\b", re.I),
    re.compile(r"this task", re.I),
    re.compile(r"\bthe issue\b", re.I),
    re.compile(r"\bI (traced|tried|measured|checked|found)\b"),
    re.compile(r"README command [12]", re.I),
    re.compile(r"\bwork item", re.I),
]
SKIPPED_SUFFIXES = (".ipynb", ".json", ".jsonl", ".png")
THIS_FILE = "tests/test_docs.py"  # holds the patterns themselves
# The README before it was rewritten as a guide: the patterns must find its narrative.
NARRATIVE_README_COMMIT = "dfbb0da"


def development_words(text: str, name: str) -> list[str]:
  """'name:line: text' for every line of `text` that matches a development pattern."""
  hits = []
  for i, line in enumerate(text.splitlines(), 1):
    if any(p.search(line) for p in DEVELOPMENT_WORDS):
      hits.append(f"{name}:{i}: {line.strip()[:120]}")
  return hits


def test_development_words_pattern_finds_narrative():
  try:
    old = subprocess.run(["git", "show", f"{NARRATIVE_README_COMMIT}:README.md"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    pytest.skip(f"commit {NARRATIVE_README_COMMIT} is not in this checkout (a shallow clone)")
  hits = development_words(old, "README.md@" + NARRATIVE_README_COMMIT)
  assert len(hits) >= 20, hits
  assert development_words("Measured on this CPU: 1.6x at batch 1.", "x") == []


def test_no_development_words_in_tracked_text():
  hits = []
  for name in _tracked_files():
    path = ROOT / name
    if name == THIS_FILE or name.endswith(SKIPPED_SUFFIXES) or not path.is_file():
      continue
    try:
      text = path.read_text()
    except UnicodeDecodeError:
      continue  # binary
    hits += development_words(text, name)
  assert not hits, "development narrative in tracked files:\n" + "\n".join(hits)


# ---------------------------------------------------------------------------------------------
# What the pages name exists: figures come from the reports, files and configs exist, commands'
# flags are defined.

DOC_PAGES = ["README.md", "experiments/results/README.md"]


def _pages_with_commands() -> list[pathlib.Path]:
  return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
          *sorted((ROOT / "experiments" / "results").glob("*/REPORT.md"))]


def _numbers(text: str) -> list[str]:
  return re.findall(r"(?<![\w.])\d+(?:\.\d+)?", text)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_headline_figures_are_quoted_from_their_reports(page):
  """Each results-table row that links a REPORT.md quotes only figures that its report holds."""
  path = ROOT / page
  checked = 0
  for line in path.read_text().splitlines():
    link = re.search(r"\]\(([^)]*REPORT\.md)\)", line)
    if not line.startswith("|") or not link:
      continue
    report = (path.parent / link.group(1)).resolve()
    if not report.exists():
      continue  # a report that lands separately (see PAGES_ADDED_SEPARATELY)
    text = report.read_text()
    headline = [c.strip() for c in line.strip().strip("|").split("|")][-2]  # the cell before the link
    missing = [n for n in _numbers(headline) if n not in _numbers(text)]
    assert not missing, f"{page}: {headline!r} quotes {missing}, not found in {os.path.relpath(report, ROOT)}"
    checked += 1
  assert checked >= 8, f"{page}: only {checked} result rows checked"


PATH_ROOTS = ("tlt_jax/", "experiments/", "configs/", "colab/", "scripts/", "tests/", "docs/", ".ci/")


def test_paths_named_in_docs_exist():
  missing = []
  for page in _pages_with_commands():
    for i, line in enumerate(page.read_text().splitlines(), 1):
      for m in re.finditer(r"(?<![\w/.<])((?:%s)[\w./-]*[\w/])" % "|".join(map(re.escape, PATH_ROOTS)), line):
        if line[m.end():m.end() + 1] in ("<", "*"):
          continue  # a pattern such as scripts/make_<name>_notebook.py
        path = m.group(1)
        if not (ROOT / path).exists() and path not in PAGES_ADDED_SEPARATELY:
          missing.append(f"{page.relative_to(ROOT)}:{i}: {path}")
  assert not missing, "named files that do not exist:\n" + "\n".join(missing)


def test_config_variants_named_in_docs_load():
  from tlt_jax import cli
  named = set()
  for page in _pages_with_commands():
    named.update(re.findall(r"(configs/\w+\.py(?::[\w,-]+)?)", page.read_text()))
  assert "configs/default.py:tiny" in named and "configs/qwen2_5_7b_gsm8k.py:v6e-64" in named
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    for spec in sorted(named):
      assert cli.load_config_file(spec) is not None, spec
  finally:
    os.chdir(cwd)


def _defined_flags(script: pathlib.Path) -> set[str]:
  text = script.read_text() + (ROOT / "experiments" / "common.py").read_text()
  return set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", text)) | {"config", "workdir", "helpfull"}


def test_experiment_commands_use_defined_flags():
  """`python experiments/X.py --flag ...` in a page: every --flag is one X.py defines."""
  bad = []
  for page in _pages_with_commands():
    text = page.read_text().replace("\\\n", " ")
    for m in re.finditer(r"python (experiments/\w+\.py)([^\n`]*)", text):
      script = ROOT / m.group(1)
      if not script.exists():
        continue  # reported by test_paths_named_in_docs_exist
      for flag in re.findall(r"(?<!\S)--([\w]+)(?=[=\s]|$)", m.group(2)):
        if flag not in _defined_flags(script):
          bad.append(f"{page.relative_to(ROOT)}: {m.group(1)} --{flag}")
  assert not bad, "flags the scripts do not define:\n" + "\n".join(bad)


def test_quickstart_error_example_is_what_the_validator_says():
  from tlt_jax import cli
  from tlt_jax import config as config_lib
  from tlt_jax.errors import one_line
  config = cli.load_config_file(str(ROOT / "configs" / "default.py"))
  config.model.num_kv_heads = 3
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert one_line(e.value) in (ROOT / "docs" / "quickstart.md").read_text()
