"""Prepares SCONE's offline corpus (tlt_jax/data/fgram_corpus.py): Python stdlib docstrings,
Debian package documentation under /usr/share/doc, and this codebase's arith task traces.

  python scripts/prepare_scone_corpus.py --out=runs/scone_corpus [--sources=stdlib,debian_doc,traces]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tlt_jax.data import fgram_corpus  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/scone_corpus")
  ap.add_argument("--sources", default=",".join(fgram_corpus.SOURCES))
  ap.add_argument("--max_chars_per_source", type=int, default=2_000_000)
  ap.add_argument("--num_traces", type=int, default=3000)
  a = ap.parse_args()
  manifest = fgram_corpus.prepare(a.out, a.sources.split(","), a.max_chars_per_source, a.num_traces)
  print(json.dumps({k: v for k, v in manifest.items() if k != "tokenizer"}, indent=1))


if __name__ == "__main__":
  main()
