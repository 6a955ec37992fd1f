"""Prepare the Python source files installed on this machine as a byte-level corpus.

    python experiments/prepare_python.py                        # stdlib + site-packages -> runs/data/python
    python experiments/prepare_python.py --corpus=stdlib --out=runs/data/stdlib

No download: it reads this interpreter's standard library and site-packages folders
in a fixed order, keeps identical files once, and splits train/validation by a hash
of each file's content (`scfa_jax.data.python_sources`). Takes seconds to tens of
seconds for a few hundred MB; does nothing when --out is already prepared. Train on
it with `python experiments/train_lm.py --data=runs/data/python ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from scfa_jax.data import prepared, python_sources  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--corpus", default="python", choices=python_sources.CORPORA,
                      help="python: standard library and site-packages; stdlib: the standard library only")  # fmt: skip
  parser.add_argument("--out", default=None, help="prepared folder to write (default runs/data/<corpus>)")
  args = parser.parse_args(argv)
  out = Path(args.out) if args.out else python_sources.DEFAULT_CACHE / args.corpus
  start = time.perf_counter()
  folder = python_sources.prepare(out, corpus=args.corpus)
  splits, meta = prepared.load(folder)
  summary = {"folder": str(folder), "seconds": round(time.perf_counter() - start, 1),
             "train_bytes": len(splits["train"]), "val_bytes": len(splits["val"]), "description": meta.description}
  print(json.dumps(summary, indent=1))
  return folder


if __name__ == "__main__":
  main()
