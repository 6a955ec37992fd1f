"""SCFA runtime against cuDNN dense causal attention (the protocol: docs/performance.md, "Setup").

Times the whole public function (sort, plan, kernels), jitted, forward, backward and
forward+backward, with masks and buckets passed as arguments (as constants XLA would
constant-fold the sort), side by side with
`jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)` in one process.
Medians over many runs via triton.testing.do_bench (CUDA events).

  python experiments/bench_attention.py --seq_lens=4096,16384 --cases=all,hash16,drop70 \
      --out=experiments/results/bench_attention_h200.json
  python experiments/bench_attention.py --plot=experiments/results/bench_attention_h200.json
  python experiments/bench_attention.py --kv_heads=8 --seq_lens=4096,16384 --cases=all,hash16,drop70 \
      --out=experiments/results/bench_attention_gqa8_h200.json   # grouped-query: 48 query heads, 8 kv heads

The JSON is rewritten after every row, so a run cut short keeps what it measured.
--plot draws runtime vs T per case with the cuDNN line, and the fwd+bwd speedups.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

import scfa_jax

CASES = {
    "all": ("qk", 0.0),
    **{f"hash{nb}": ("hash", nb) for nb in (2, 4, 8, 16, 32, 64)},
    **{f"drop{int(r * 100)}": ("qk", r) for r in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)},
}


def versions() -> dict:
  out = {"python": platform.python_version(), "device": str(jax.devices()[0].device_kind)}
  for name in ("jax", "jaxlib", "triton", "jax-triton", "jax-cuda13-plugin"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  try:
    out["driver"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
  except OSError:
    out["driver"] = None
  return out


def bench(fn, *args, rep_ms: int = 300) -> float:
  """Median milliseconds of fn(*args), blocking on the whole output pytree."""
  import triton.testing  # noqa: PLC0415

  jax.block_until_ready(fn(*args))
  run = lambda: jax.block_until_ready(fn(*args))
  return float(triton.testing.do_bench(run, warmup=rep_ms // 6, rep=rep_ms, return_mode="median"))


def make_case(name, b, t, n, seed, kv_heads=None):
  """(attention fn, query masks [B, T, N], key masks [B, T, K], density); K = kv_heads or N."""
  mode, param = CASES[name]
  kv_heads = n if kv_heads is None else kv_heads
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  if mode == "hash":
    # In the dtype lsh_buckets gives for this many buckets (uint8), which sets the sort's key width.
    dtype = scfa_jax.lsh.bucket_dtype(param)
    q_masks = jax.random.randint(k1, (b, t, n), 0, param, dtype)
    k_masks = jax.random.randint(k2, (b, t, kv_heads), 0, param, dtype)
    fn = lambda q, k, v, qm, km: scfa_jax.hash_sparse_attention(q, k, v, q_buckets=qm, k_buckets=km)
    density = 1.0 / param
  else:
    q_masks = jax.random.bernoulli(k1, 1.0 - param, (b, t, n))
    k_masks = jax.random.bernoulli(k2, 1.0 - param, (b, t, kv_heads))
    fn = lambda q, k, v, qm, km: scfa_jax.qk_sparse_attention(q, k, v, q_keep=qm, k_keep=km)
    density = (1.0 - param) ** 2
  return fn, q_masks, k_masks, density


def timings(attention, q, k, v, *extra, rep_ms: int = 300) -> dict:
  fwd = jax.jit(attention)
  out = fwd(q, k, v, *extra)
  do = jax.random.normal(jax.random.PRNGKey(7), out.shape, out.dtype)

  def fwd_bwd_fn(q, k, v, do, *extra):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, *extra), q, k, v)
    return out, vjp(do)

  fwd_bwd = jax.jit(fwd_bwd_fn)
  # Backward alone: the vjp closure of a saved forward (residuals computed once, outside the timing).
  _, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, *extra), q, k, v)
  bwd = jax.jit(lambda vjp, do: vjp(do))
  return {
      "fwd_ms": bench(fwd, q, k, v, *extra, rep_ms=rep_ms),
      "bwd_ms": bench(bwd, vjp, do, rep_ms=rep_ms),
      "fwd_bwd_ms": bench(fwd_bwd, q, k, v, do, *extra, rep_ms=rep_ms),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=48)
  parser.add_argument(
      "--kv_heads", type=int, default=0, help="kv heads K dividing --heads (grouped-query, cuDNN alike); 0: --heads"
  )
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--seq_lens", default="512,1024,2048,4096,8192,16384,32768,4000")
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--out", default="")
  parser.add_argument("--rep_ms", type=int, default=300, help="measuring time per timing (do_bench rep)")
  parser.add_argument("--plot", default="", help="only draw the figure of this JSON result file")
  args = parser.parse_args()
  if args.plot:
    print("wrote", plot(args.plot))
    return

  b, n, h = args.batch, args.heads, args.head_dim
  kv_heads = args.kv_heads or n
  if n % kv_heads:
    parser.error(f"--kv_heads must divide --heads, got {kv_heads} and {n}")
  dtype = jnp.dtype(args.dtype)
  info = versions()
  print(json.dumps(info))
  rows = []
  for t in (int(x) for x in args.seq_lens.split(",")):
    q = jax.random.normal(jax.random.PRNGKey(0), (b, t, n, h), dtype)
    k, v = (jax.random.normal(jax.random.PRNGKey(i), (b, t, kv_heads, h), dtype) for i in (1, 2))
    # cuDNN takes k and v with fewer heads than q as grouped-query attention, as the functions do.
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    start = time.perf_counter()
    base = timings(dense, q, k, v, rep_ms=args.rep_ms)
    causal_flops = 4 * b * n * h * t * (t + 1) / 2  # two matmuls of the causal half, 2 flops per MAC
    print(f"T={t:6d} cudnn      fwd {base['fwd_ms']:8.3f}  bwd {base['bwd_ms']:8.3f}  fwd+bwd {base['fwd_bwd_ms']:8.3f} ms")
    for name in args.cases.split(","):
      fn, qm, km, density = make_case(name, b, t, n, seed=t, kv_heads=kv_heads)
      ours = timings(fn, q, k, v, qm, km, rep_ms=args.rep_ms)
      row = dict(T=t, case=name, density=density, **ours, **{f"cudnn_{key}": val for key, val in base.items()})
      for key in ("fwd", "bwd", "fwd_bwd"):
        row[f"speedup_{key}"] = base[f"{key}_ms"] / ours[f"{key}_ms"]
      # Useful work: the causal pairs that survive the sparsity, forward 2 matmuls + backward 5.
      row["useful_tflops_fwd_bwd"] = causal_flops * density * 3.5 / (ours["fwd_bwd_ms"] * 1e-3) / 1e12
      rows.append(row)
      if args.out:
        shape = dict(batch=b, heads=n, kv_heads=kv_heads, head_dim=h, dtype=args.dtype)
        write(args.out, dict(versions=info, **shape, rows=rows))
      print(
          f"T={t:6d} {name:10s} fwd {ours['fwd_ms']:8.3f}  bwd {ours['bwd_ms']:8.3f}  fwd+bwd {ours['fwd_bwd_ms']:8.3f} ms"
          f"   speedup fwd {row['speedup_fwd']:5.2f}  bwd {row['speedup_bwd']:5.2f}  fwd+bwd {row['speedup_fwd_bwd']:5.2f}"
          f"   useful {row['useful_tflops_fwd_bwd']:6.1f} TFLOP/s",
          flush=True,
      )
    print(f"  (T={t} took {time.perf_counter() - start:.0f} s)", flush=True)
  if args.out:
    print("wrote", args.out)


def write(path: str, result: dict) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=1)


def plot(path: str) -> str:
  """Runtime vs T (log-log) per case with the cuDNN line, and fwd+bwd speedup per case; a PNG next to path."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  with open(path) as f:
    result = json.load(f)
  rows = sorted(result["rows"], key=lambda r: r["T"])
  cases = list(dict.fromkeys(r["case"] for r in rows))
  fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(13, 5))
  cudnn = {r["T"]: r["cudnn_fwd_bwd_ms"] for r in rows}
  ax_time.plot(list(cudnn), list(cudnn.values()), "k--", marker="s", label="cuDNN dense causal")
  for case in cases:
    mine = [r for r in rows if r["case"] == case]
    ax_time.plot([r["T"] for r in mine], [r["fwd_bwd_ms"] for r in mine], marker="o", label=f"SCFA {case}")
  ax_time.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="fwd+bwd ms (median)")
  ax_time.set_title("Runtime, whole public function vs cuDNN")
  ax_time.legend(fontsize=7)
  lengths = sorted(cudnn)
  width = 0.8 / max(len(lengths), 1)
  for i, t in enumerate(lengths):
    speed = {r["case"]: r["speedup_fwd_bwd"] for r in rows if r["T"] == t}
    ax_speed.bar([c + (i - (len(lengths) - 1) / 2) * width for c in range(len(cases))],
                 [speed.get(c, 0.0) for c in cases], width, label=f"T={t}")  # fmt: skip
  ax_speed.axhline(1.0, color="k", lw=0.8)
  ax_speed.set_xticks(range(len(cases)), cases, rotation=45)
  ax_speed.set(yscale="log", ylabel="cuDNN ms / SCFA ms (fwd+bwd)")
  ax_speed.set_title("Speedup over cuDNN")
  ax_speed.legend(fontsize=7)
  v = result["versions"]
  kv_heads = result.get("kv_heads", result["heads"])  # files from before --kv_heads have none
  heads = f"N={result['heads']}" + (f" K={kv_heads}" if kv_heads != result["heads"] else "")
  fig.suptitle(f"{v['device']}, B={result['batch']} {heads} H={result['head_dim']} {result['dtype']}")
  fig.tight_layout()
  out = path.rsplit(".", 1)[0] + ".png"
  fig.savefig(out, dpi=120)
  return out


if __name__ == "__main__":
  main()
