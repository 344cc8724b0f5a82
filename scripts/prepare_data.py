"""Published GSM8K / MATH files -> verl-style parquet train/test splits (tlt_jax/data/prepare.py).

Get the published files on a machine with internet (either command works):
  huggingface-cli download openai/gsm8k --repo-type dataset --local-dir raw/gsm8k
      # raw/gsm8k/main/train-00000-of-00001.parquet, raw/gsm8k/main/test-00000-of-00001.parquet
  huggingface-cli download DigitalLearningGmbH/MATH-lighteval --repo-type dataset --local-dir raw/math
      # raw/math/data/train-00000-of-00001.parquet, raw/math/data/test-00000-of-00001.parquet
  huggingface-cli download HuggingFaceH4/MATH-500 --repo-type dataset --local-dir raw/math500
      # raw/math500/test.jsonl  (problem, solution, answer, subject, level, unique_id)

Then (no network needed):
  python scripts/prepare_data.py gsm8k --train raw/gsm8k/main/train-00000-of-00001.parquet \
      --test raw/gsm8k/main/test-00000-of-00001.parquet --out data/gsm8k
  python scripts/prepare_data.py math --train raw/math/data/train-00000-of-00001.parquet \
      --test raw/math500/test.jsonl --out data/math
  python scripts/prepare_data.py gsm8k --train my_gsm8k.jsonl --test_size 0.05 --out data/mine

Writes OUT/train.parquet and OUT/test.parquet (columns data_source, prompt, ability,
reward_model, extra_info); train with `--config.task.name=verl --config.task.path=OUT/train.parquet`.
Rows without a final answer are skipped and counted (--on_bad_record=error stops at the first).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tlt_jax.data import prepare  # noqa: E402
from tlt_jax.errors import DataError  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("dataset", choices=sorted(prepare.DATASETS))
  ap.add_argument("--train", required=True, help="published train file (.parquet, .jsonl, .json)")
  ap.add_argument("--test", default=None, help="published test file; else --test_size of --train is held out")
  ap.add_argument("--test_size", type=float, default=0.0, help="fraction (< 1) or count of --train held out")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", required=True)
  ap.add_argument("--instruction", default=None, help="text appended to each problem (default: the "
                  "dataset's customary one; '' for none)")
  ap.add_argument("--data_source", default=None, help="data_source written to each row (picks the verifier)")
  ap.add_argument("--on_bad_record", choices=("skip", "error"), default="skip")
  a = ap.parse_args(argv)
  test_size = a.test_size if a.test_size < 1 else int(a.test_size)
  try:
    counts = prepare.prepare(a.dataset, a.train, a.out, test=a.test, test_size=test_size, seed=a.seed,
                             instruction=a.instruction, data_source=a.data_source, on_bad_record=a.on_bad_record)
  except (DataError, ValueError, OSError) as e:
    print(f"data error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"dataset": a.dataset, "out": a.out, "rows": counts}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
