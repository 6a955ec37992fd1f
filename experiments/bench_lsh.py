"""GPU time of the model's LSH (`lsh.centered_buckets`) per layer: XLA's jnp against the
Triton kernel (`kernels/lsh.py`), side by side in one process.

Each timed call hashes --layers different inputs [B, T, N, H] in one jitted function,
as a model's step does, so that the host's per-call cost is spread over the layers; the
rows give milliseconds per layer. The inputs carry an offset shared by every token, as
transformer activations do. `agreement` is the share of buckets equal to XLA's (the kernel
round the float32 sums in another order, so near-ties may go either way).

  python experiments/bench_lsh.py --cases=8192x4,16384x2,32768x1,65536x1 \
      --out=experiments/results/bench_lsh_h100.json
  python experiments/bench_lsh.py --cases=8192x4 --tiles=64:4,128:8,256:8 --out=lsh_tiles.json

--tiles times the kernel at other (tokens per program, warps) settings;
--documents also times packed rows (segment ids of documents 512 to 8192 tokens long).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from experiments.bench_attention import document_lengths, segment_ids, versions  # noqa: E402
from scfa_jax import lsh, triton_backend  # noqa: E402


def time_ms(fn, *args, rep_ms: int) -> float:
  """Median ms of fn(*args): CUDA events through triton.testing.do_bench on a GPU, wall
  clock elsewhere."""
  jax.block_until_ready(fn(*args))
  run = lambda: jax.block_until_ready(fn(*args))  # noqa: E731
  if jax.default_backend() == "gpu":
    import triton.testing  # noqa: PLC0415

    return float(triton.testing.do_bench(run, warmup=rep_ms // 6, rep=rep_ms, return_mode="median"))
  samples, end = [], time.perf_counter() + rep_ms / 1e3
  while not samples or time.perf_counter() < end:
    start = time.perf_counter()
    run()
    samples.append(1e3 * (time.perf_counter() - start))
  return statistics.median(samples)


def variants(implementations: list[str], tiles: list[str]) -> dict:
  """name -> bucket function (x, rotations, segment_ids) of one layer."""
  out = {}
  for impl in implementations:
    out[impl] = lambda x, r, s, impl=impl: lsh.centered_buckets(x, r, s, implementation=impl)
  dtype = lambda r: lsh.bucket_dtype(2 * r.shape[-1])  # noqa: E731
  for spec in tiles:
    block_t, *launch = (int(v) for v in spec.split(":"))
    setting = triton_backend.LshTiles(block_t=block_t, **dict(zip(("num_warps", "num_stages"), launch)))
    out[f"triton_{spec}"] = lambda x, r, s, t=setting: triton_backend.centered_buckets("triton", x, r, s, dtype(r), t)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default="8192x4,16384x2", help="comma-separated TxB")
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--num_buckets", type=int, default=16)
  parser.add_argument("--dtype", default="bfloat16", help="of the inputs (the interpreter takes float32)")
  parser.add_argument("--layers", type=int, default=12, help="inputs hashed per timed call")
  parser.add_argument("--implementations", default="xla,triton")
  parser.add_argument("--tiles", default="", help="extra kernel settings block_t[:num_warps[:num_stages]]")
  parser.add_argument("--documents", action="store_true", help="also time packed rows")
  parser.add_argument("--rep_ms", type=int, default=300)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  fns = variants(args.implementations.split(","), [s for s in args.tiles.split(",") if s])
  rows = []
  result = dict(versions=versions(), flags=vars(args), rows=rows,
                default_tiles=dataclasses.asdict(triton_backend._LSH_TILES["triton"]))  # fmt: skip
  for case in args.cases.split(","):
    t, b = (int(v) for v in case.split("x"))
    key = jax.random.key(t + b)
    shape = (args.layers, b, t, args.heads, args.head_dim)
    xs = (jax.random.normal(key, shape, jnp.float32) + 0.5).astype(args.dtype)
    rotations = lsh.random_rotations(jax.random.fold_in(key, 1), args.heads, args.head_dim, args.num_buckets)
    layouts = [None]
    if args.documents:
      layouts.append(jnp.asarray(segment_ids(document_lengths(t, b))))
    for seg in layouts:
      outputs = {}
      for name, fn in fns.items():
        layered = jax.jit(lambda xs, r, s, fn=fn: jnp.stack([fn(x, r, s) for x in xs]))
        ms = time_ms(layered, xs, rotations, seg, rep_ms=args.rep_ms)
        outputs[name] = np.asarray(layered(xs, rotations, seg))
        row = dict(T=t, batch=b, documents=seg is not None, variant=name, ms_per_layer=ms / args.layers)
        if name != "xla" and "xla" in outputs:
          row["agreement"] = float(np.mean(outputs[name] == outputs["xla"]))
        rows.append(row)
        print(json.dumps(row), flush=True)
      if args.out:
        with open(args.out, "w") as f:
          json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
