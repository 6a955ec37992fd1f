"""Decoding speed of the paper's 122M GPT with a key/value cache, per attention mode, against recomputing.

    python experiments/bench_decode.py                     # cache lengths 8192, 32768, 65536; batch 1 and 16
    python experiments/bench_decode.py --lengths=8192 --batch_sizes=16 --modes=hash16,hash16_pages
    python experiments/bench_decode.py --preset=cpu_tiny --lengths=64,256 --batch_sizes=1,2   # CPU smoke test

Untrained weights: the speed does not depend on them, except through the balance of the
buckets, which the centered LSH keeps near uniform at initialisation. For each cache length
L and batch B, a random prompt of L tokens goes in by `GPT.prefill`; then `--steps` greedy
decode steps are timed after `--warmup` untimed ones, each one jitted `GPT.decode_step`
with the cache donated. Modes:

  dense              the cache in position order, every step reads all L keys under a mask
  hash16             hash-16 attention, the same masked read (the buckets change only the mask)
  hash16_pages       hash-16 with the bucket-paged cache (`--page_size`): a step reads only
                     the pages of its query's bucket, about L / 16 keys
  recompute_dense    no cache: one forward pass over the L tokens for each new token
  recompute_hash16   (`GPT.prefill`, logits of the last position only), with cuDNN or the
                     hash-16 kernels on a GPU

Each row reports ms per step (one new token per sequence), tokens/s (B per step), the
speed-up over recomputing with the same attention, compile seconds and, with bucket
pages, the largest bucket's share of the keys (a step reads until the longest bucket of
the batch is read). Results go to JSON with the device, library versions and commit,
after every case.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.bench_model import versions  # noqa: E402
from scfa_jax.model import GPT, preset  # noqa: E402

MODES = {  # name: (attention, cache layout, what is timed)
    "dense": ("dense", None, "decode"),
    "hash16": ("hash", None, "decode"),
    "hash16_pages": ("hash", "pages", "decode"),
    "recompute_dense": ("dense", None, "recompute"),
    "recompute_hash16": ("hash", None, "recompute"),
}


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _init_cache(graphdef, state, batch_size, max_length, page_size):
  model = nnx.merge(graphdef, state)
  rngs = nnx.Rngs(attention=jax.random.key(1))
  return model.init_cache(batch_size, max_length, rngs=rngs, page_size=page_size)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill(graphdef, state, cache, tokens):
  logits, cache = nnx.merge(graphdef, state).prefill(tokens, cache)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode_step(graphdef, state, cache, tokens):
  logits, cache = nnx.merge(graphdef, state).decode_step(tokens, cache)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def bench_attention(attention, rows_wanted, *, length, batch, args) -> list[dict]:
  """The rows of one model (one attention): recompute and decode with either cache layout."""
  block = length + args.warmup + args.steps
  config = preset(args.preset, attention=attention, num_buckets=16, block_size=block)
  graphdef, state = nnx.split(GPT(config, rngs=nnx.Rngs(0)))
  prompt = jax.random.randint(jax.random.key(0), (batch, length), 0, config.vocab_size, jnp.int32)
  rows, first_prefill = [], {}  # layout: the first prefill's seconds, compilation included
  for name, layout in rows_wanted:
    page_size = args.page_size if layout == "pages" else None
    cache = _init_cache(graphdef, state, batch, config.block_size, page_size)
    start = time.perf_counter()
    token, cache = _prefill(graphdef, state, cache, prompt)
    first_prefill.setdefault(layout, _block(token, start))
    row = {"mode": name, "length": length, "batch": batch}
    if MODES[name][2] == "recompute":
      times = []
      for _ in range(args.recompute_repeats):
        start = time.perf_counter()
        token, cache = _prefill(graphdef, state, cache, prompt)
        times.append(_block(token, start))
      seconds = float(np.median(times))
      compile_s = first_prefill[layout] - seconds
      row.update(ms_per_step=1e3 * seconds, tokens_per_s=batch / seconds, compile_s=compile_s)
    else:
      start = time.perf_counter()
      token, cache = _decode_step(graphdef, state, cache, token)
      first = _block(token, start)
      for _ in range(args.warmup - 1):
        token, cache = _decode_step(graphdef, state, cache, token)
      jax.block_until_ready(token)
      start = time.perf_counter()
      for _ in range(args.steps):  # each step takes the last one's token: they run in order
        token, cache = _decode_step(graphdef, state, cache, token)
      seconds = _block(token, start) / args.steps
      row.update(ms_per_step=1e3 * seconds, tokens_per_s=batch / seconds, compile_s=first - seconds)
      if layout == "pages":
        shares = [float(jnp.max(layer.pages.counts)) / float(layer.length) for layer in cache]
        row["largest_bucket_share"] = float(np.mean(shares))
    rows.append(row)
    del cache
  return rows


def _block(x, start: float) -> float:
  jax.block_until_ready(x)
  return time.perf_counter() - start


def add_ratios(rows: list[dict]) -> None:
  """speedup_vs_recompute: a decode row's tokens/s over recomputing with the same attention."""
  for row in rows:
    if "error" in row or MODES[row["mode"]][2] != "decode":
      continue
    recompute = f"recompute_{'dense' if MODES[row['mode']][0] == 'dense' else 'hash16'}"
    for other in rows:
      if (other["mode"], other["length"], other["batch"]) == (recompute, row["length"], row["batch"]):
        if "tokens_per_s" in other:
          row["speedup_vs_recompute"] = row["tokens_per_s"] / other["tokens_per_s"]


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="gpt122m", help="GPT preset (cpu_tiny for a smoke test)")
  parser.add_argument("--lengths", default="8192,32768,65536", help="comma-separated cache lengths L")
  parser.add_argument("--batch_sizes", default="1,16", help="comma-separated batch sizes B")
  parser.add_argument("--modes", default=",".join(MODES), help=f"among {list(MODES)}")
  parser.add_argument("--steps", type=int, default=32, help="timed decode steps per case")
  parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (>= 1: compiles)")
  parser.add_argument("--recompute_repeats", type=int, default=3, help="timed forward passes per recompute")
  parser.add_argument("--page_size", type=int, default=256, help="rows per page of the bucket-paged cache")
  parser.add_argument("--out", default=None, help="JSON path (default results/bench_decode_<platform>.json)")
  args = parser.parse_args(argv)
  modes = args.modes.split(",")
  if unknown := [m for m in modes if m not in MODES]:
    parser.error(f"--modes: unknown {unknown}; known: {list(MODES)}")
  if args.warmup < 1 or args.steps < 1:
    parser.error("--warmup and --steps must be >= 1")

  info = versions()
  print(json.dumps(info), flush=True)
  out = Path(args.out or Path(__file__).parent / "results" / f"bench_decode_{jax.default_backend()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  rows: list[dict] = []

  def write():  # after every case, so that a run cut short keeps what it measured
    out.write_text(json.dumps({"versions": info, "args": vars(args), "results": rows}, indent=1) + "\n")

  for length in (int(x) for x in args.lengths.split(",")):
    for batch in (int(x) for x in args.batch_sizes.split(",")):
      for attention in ("dense", "hash"):
        wanted = [(m, MODES[m][1]) for m in modes if MODES[m][0] == attention]
        if not wanted:
          continue
        try:
          new = bench_attention(attention, wanted, length=length, batch=batch, args=args)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory: record it and go on)
          new = [{"mode": m, "length": length, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:400]}"}
                 for m, _ in wanted]  # fmt: skip
        for row in new:
          print(json.dumps(row), flush=True)
        rows.extend(new)
        add_ratios(rows)
        write()

  header = [("L", 6), ("B", 3), ("mode", 17), ("ms/step", 9), ("tokens/s", 9), ("vs recompute", 12),
            ("compile s", 9)]  # fmt: skip
  print("\n" + " ".join(f"{name:>{width}}" for name, width in header))
  for row in rows:
    if "error" in row:
      print(f"{row['length']:>6} {row['batch']:>3} {row['mode']:>17}  {row['error'][:60]}")
      continue
    ratio = f"{row['speedup_vs_recompute']:.1f}x" if "speedup_vs_recompute" in row else ""
    print(f"{row['length']:>6} {row['batch']:>3} {row['mode']:>17} {row['ms_per_step']:9.2f} "
          f"{row['tokens_per_s']:9.0f} {ratio:>12} {row['compile_s']:9.1f}")  # fmt: skip
  print(f"results: {out}")
  return rows


if __name__ == "__main__":
  main()
