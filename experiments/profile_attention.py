"""Where the time goes: GPU time of each stage of the public function, per kernel variant.

For each case at one T (B=4, N=48, H=64, bf16 unless told), runs forward+backward of the
public function (sort, plans, kernels) under CUPTI (through torch.profiler, which records
every kernel in the process, JAX's and jax-triton's too) and sums GPU time per stage:
the sort, the tile plans' kernels, the other XLA kernels (casts, copies, and the plans of
a caller's order), and each SCFA kernel. The wall time (do_bench median, dispatch
included; and pipelined, calls back to back) is reported next to it, and next to cuDNN's
(whose kernels count as "xla_other").
Tile configs (variants: a `KernelConfig` per head dim and mode) run side by side, their
outputs checked against the first's (see `variant` for the spelling).

  python experiments/profile_attention.py --seq_len=16384 --cases=all,hash16,hash64,drop70 \
      --out=profile.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from experiments.bench_attention import CASES, SHARED_STRICT, key_masks, make_case, timings, versions  # noqa: E402
from scfa_jax import core, sorting, triton_backend  # noqa: E402


def _table(mode: bool | None):
  """(head dim, hashed, grouped) -> the tile table's KernelConfig, for the call's own mode
  (None) or always that of one mode (False: QK, True: hash)."""
  return lambda h, hashed, grouped=False: triton_backend.kernel_config(
      "triton", h, hashed if mode is None else mode, grouped
  )


BASES = {"table": _table(None), "qk_table": _table(False), "hash_table": _table(True)}


def variant(spec: str):
  """A tile config per (head dim, hashed) from `base` or `base+field=value+...`, e.g.
  `hash_table+num_stages=2+prefetch_rows=0`: a table entry with KernelConfig fields replaced."""
  base, *overrides = spec.split("+")
  fields = {name: int(value) for name, value in (o.split("=") for o in overrides)}
  kinds = {f.name: f.type for f in dataclasses.fields(triton_backend.KernelConfig)}
  if base not in BASES or not set(fields) <= set(kinds):
    raise ValueError(f"variant {spec!r}: base must be one of {list(BASES)}, fields among {list(kinds)}")
  fields = {name: bool(value) if kinds[name] in (bool, "bool") else value for name, value in fields.items()}
  return lambda h, hashed, grouped=False: dataclasses.replace(BASES[base](h, hashed, grouped), **fields)


def stage(kernel_name: str) -> str:
  for name in ("scfa_fwd", "scfa_bwd_dq", "scfa_bwd_dkdv", "scfa_plan"):
    if name in kernel_name:
      return name
  if any(word in kernel_name.lower() for word in ("sort", "radix", "cub::")):
    return "sort"
  return "xla_other"


def gpu_ms(fn, *args, iters: int = 5, kernels: list | None = None) -> dict[str, float]:
  """GPU milliseconds per call of fn(*args), summed per `stage` of the kernel names.

  With `kernels` (a list), appends (name, launches per call, GPU ms per call) of every kernel.
  """
  import torch  # noqa: PLC0415  (its profiler reads CUPTI for the whole process)
  from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

  jax.block_until_ready(fn(*args))
  with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(iters):
      jax.block_until_ready(fn(*args))
  totals = collections.Counter()
  for event in prof.key_averages():
    us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
    totals[stage(event.key)] += us / 1e3 / iters
    if kernels is not None and us:
      kernels.append((event.key[:80], event.count / iters, us / 1e3 / iters))
  totals["gpu_total"] = sum(totals.values())
  return dict(totals)


def pipelined_ms(fn, *args, calls: int = 50) -> float:
  """Wall milliseconds per call of `calls` calls dispatched back to back, blocking once:
  the host's dispatch hides behind the previous call's kernels, unlike in do_bench."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)  # only the last call's outputs stay alive; one stream runs them in order
  jax.block_until_ready(out)
  return (time.perf_counter() - start) * 1e3 / calls


_TIMELINE_CATEGORIES = ("cuda_runtime", "cuda_driver", "kernel", "gpu_memcpy", "gpu_memset")


def timeline(fn, *args) -> dict:
  """One call of fn(*args) after warm-up: its host CUDA API calls and GPU kernels on one
  clock (CUPTI through torch.profiler), in microseconds from the call's first event, and
  `prefix_us`, the GPU time from the first kernel to the first SCFA kernel's start: the
  part of a call-by-call timing where the GPU mostly waits for the host's launches."""
  import tempfile  # noqa: PLC0415

  from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

  jax.block_until_ready(fn(*args))
  with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    jax.block_until_ready(fn(*args))
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    prof.export_chrome_trace(f.name)
    events = json.loads(Path(f.name).read_text())["traceEvents"]
  events = sorted(
      (e for e in events if e.get("ph") == "X" and e.get("cat") in _TIMELINE_CATEGORIES), key=lambda e: e["ts"]
  )
  kernels = [e for e in events if e["cat"] == "kernel"]
  end = max(e["ts"] + e["dur"] for e in kernels)
  events = [e for e in events if e["ts"] <= end]  # not the profiler's own calls at its exit
  start = events[0]["ts"]
  attention = ("scfa_fwd", "scfa_bwd_dq", "scfa_bwd_dkdv")
  first_scfa = min((e["ts"] for e in kernels if stage(e["name"]) in attention), default=end)
  return dict(
      prefix_us=first_scfa - kernels[0]["ts"],
      events=[f"{e['ts'] - start:9.1f} {e['dur']:8.1f} {e['cat']:12s} {e['name'][:70]}" for e in events],
  )


def _sort(case, q_masks, k_masks) -> sorting.SortedTokens:
  k_masks = key_masks(case, q_masks, k_masks)
  return sorting.by_bucket(q_masks, k_masks) if CASES[case][0] == "hash" else sorting.by_keep_mask(q_masks, k_masks)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def profile_case(case, q, k, v, t, rep_ms, variants, list_kernels=False, with_timeline=False):
  b, _, n, h = q.shape
  mode = CASES[case][0]
  _, qm, km, density = make_case(case, b, t, n, seed=t)
  do = jax.random.normal(jax.random.PRNGKey(7), q.shape, q.dtype)
  rows, reference = [], None
  for variant, make_tiles in variants.items():
    tiles = make_tiles(h, mode == "hash")
    strict = case in SHARED_STRICT
    config = core.AttentionConfig(implementation="triton", strict=strict, scale=h**-0.5, kernel=tiles)

    def attention(q, k, v, qm, km, config=config):  # the public function with `tiles`
      return core.attention(q, k, v, _sort(case, qm, km), config)

    def fwd_bwd(q, k, v, do, qm, km, attention=attention):
      out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, qm, km), q, k, v)
      return out, vjp(do)

    outs = jax.jit(fwd_bwd)(q, k, v, do, qm, km)
    errors = {}
    if reference is None:
      reference = outs
    else:
      pairs = zip("oqkv", jax.tree.leaves(outs), jax.tree.leaves(reference), strict=True)
      errors = {f"rel_err_{x}": _rel(a, r) for x, a, r in pairs}
    row = dict(case=case, T=t, variant=variant, density=density)
    row.update(timings(attention, q, k, v, qm, km, rep_ms=rep_ms))
    kernels = []
    row["fwd_bwd_pipelined_ms"] = pipelined_ms(jax.jit(fwd_bwd), q, k, v, do, qm, km)
    row["gpu_fwd_bwd_ms"] = gpu_ms(jax.jit(fwd_bwd), q, k, v, do, qm, km, kernels=kernels)
    row["launches_fwd_bwd"] = sum(count for _, count, _ in kernels)
    if with_timeline:
      row["timeline_fwd_bwd"] = timeline(jax.jit(fwd_bwd), q, k, v, do, qm, km)
    if list_kernels:
      row["kernels_fwd_bwd"] = sorted(kernels, key=lambda x: -x[2])
    tokens = jax.jit(functools.partial(_sort, case))(qm, km)
    plans = jax.jit(lambda tokens: triton_backend.make_plans(config, q, tokens, backward=True))
    row["gpu_plans_ms"] = gpu_ms(plans, tokens)["gpu_total"]  # all three kernels' plans
    plan = plans(tokens).fwd
    visited = jnp.mean((plan.end_n - plan.start_n).astype(jnp.float32))
    row["visited_tile_fraction_fwd"] = float(visited) / plan.num_k_tiles
    rows.append(dict(row, **errors))
  return rows


def _print(row):
  gpu = " ".join(f"{key}={val:.3f}" for key, val in sorted(row.get("gpu_fwd_bwd_ms", {}).items()))
  errors = " ".join(f"{key[8:]}={val:.1e}" for key, val in row.items() if key.startswith("rel_err"))
  if "gpu_plans_ms" in row:
    gpu += f" (plans alone {row['gpu_plans_ms']:.3f}; {row['launches_fwd_bwd']:.0f} launches)"
  if "timeline_fwd_bwd" in row:
    gpu += f" prefix {row['timeline_fwd_bwd']['prefix_us']:.0f} us"
  print(
      f"{row['case']:7s} {row.get('variant', ''):15s} fwd {row['fwd_ms']:7.3f} bwd {row['bwd_ms']:7.3f} "
      f"fwd+bwd {row['fwd_bwd_ms']:7.3f} (pipelined {row['fwd_bwd_pipelined_ms']:7.3f}) ms "
      f"| GPU: {gpu} {errors}",
      flush=True,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_len", type=int, default=16384)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=48)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--cases", default="all,hash2,hash16,hash64,drop70")
  parser.add_argument("--variants", default="table")
  parser.add_argument("--rep_ms", type=int, default=100)
  parser.add_argument("--out", default="")
  parser.add_argument("--list_kernels", action="store_true", help="record every kernel's launches and GPU time")
  parser.add_argument("--timeline", action="store_true", help="record one call's host API calls and kernels")
  args = parser.parse_args()
  b, n, h, t = args.batch, args.heads, args.head_dim, args.seq_len
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (b, t, n, h), jnp.bfloat16) for i in range(3))
  info = versions()
  print(json.dumps(info), flush=True)
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  do = jax.random.normal(jax.random.PRNGKey(7), q.shape, q.dtype)

  def dense_fwd_bwd(q, k, v, do):  # what the SCFA cases' fwd_bwd returns: O and the gradients
    out, vjp = jax.vjp(dense, q, k, v)
    return out, vjp(do)

  dense_fwd_bwd = jax.jit(dense_fwd_bwd)
  rows = [dict(case="cudnn", T=t, **timings(dense, q, k, v, rep_ms=args.rep_ms))]
  rows[0]["fwd_bwd_pipelined_ms"] = pipelined_ms(dense_fwd_bwd, q, k, v, do)
  rows[0]["gpu_fwd_bwd_ms"] = gpu_ms(dense_fwd_bwd, q, k, v, do)
  _print(rows[0])
  variants = {spec: variant(spec) for spec in args.variants.split(",")}
  for case in args.cases.split(","):
    for row in profile_case(case, q, k, v, t, args.rep_ms, variants, args.list_kernels, args.timeline):
      _print(row)
      rows.append(row)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(dict(versions=info, batch=b, heads=n, head_dim=h, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
