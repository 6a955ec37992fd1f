"""Runs one case's SCFA kernels (forward, dQ, dK/dV) once each, for Nsight Compute, next to
PyTorch's cuDNN and FlashAttention-2 kernels on the same dense causal problem.

`ncu` segfaults when attached to a JAX process that uses the GPU (jax 0.11.2), so the
kernels here are launched by Triton's own launcher on torch CUDA tensors. JAX runs on the
CPU: it sorts the tokens and calls the Triton backend's `forward` and `backward`, whose
every launch (plan kernels included) this script routes to the GPU through torch. Same
kernels, tile table and constexprs as through jax-triton; Triton's launcher also
specializes int arguments that are multiples of 16, which `ALIGNED` already gives them.
Only the launches between cudaProfilerStart and Stop are profiled:

  ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
      --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section LaunchStats --export report python experiments/ncu_attention.py --cases=all,hash64
  ncu --import report.ncu-rep --csv --page raw > report.csv
  python experiments/ncu_attention.py --summarize=report.csv --cases=all,hash64 --out=summary.json

Where inside a kernel the warps wait: profile with `--section SourceCounters`, then
`ncu --import report.ncu-rep --page source --csv --print-source sass > sass.csv` and
`python experiments/ncu_attention.py --summarize_source=sass.csv`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported: the GPU is torch's

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from experiments.bench_attention import CASES, make_case  # noqa: E402
from experiments.profile_attention import _sort as sort_tokens  # noqa: E402
from scfa_jax import core, triton_backend  # noqa: E402


def _to_torch(x, cache: dict):
  import torch  # noqa: PLC0415

  if id(x) not in cache:
    a = np.asarray(x)
    if a.dtype == ml_dtypes.bfloat16:
      t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
      t = torch.from_numpy(np.array(a))  # a writable copy
    cache[id(x)] = (x, t.to(_device()))  # x kept alive so that its id stays its own
  return cache[id(x)][1]


def _device() -> str:
  """The GPU; the CPU only to try this script under TRITON_INTERPRET=1."""
  import torch  # noqa: PLC0415

  return "cuda" if torch.cuda.is_available() else "cpu"


def _to_jax(t) -> jax.Array:
  import torch  # noqa: PLC0415

  if t.dtype == torch.bfloat16:
    return jnp.asarray(t.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16))
  return jnp.asarray(t.cpu().numpy())


def torch_launcher(cache: dict):
  """A stand-in for `triton_backend._launch`: the same kernel, grid and constexprs, run by
  Triton's launcher on torch CUDA tensors; outputs come back as (CPU) jax arrays."""
  import torch  # noqa: PLC0415

  def launch(implementation, kernel, *, name, grid, inputs, out_shapes, num_warps, num_stages, **meta):
    del implementation, name
    args = [x if isinstance(x, int) else _to_torch(x, cache) for x in inputs]
    dtype = lambda d: torch.bfloat16 if d == jnp.bfloat16 else getattr(torch, str(np.dtype(d)))
    outputs = [torch.empty(s.shape, dtype=dtype(s.dtype), device=_device()) for s in out_shapes]
    kernel[grid](*args, *outputs, num_warps=num_warps, num_stages=num_stages, **meta)
    if torch.cuda.is_available():
      torch.cuda.synchronize()
    return tuple(_to_jax(o) for o in outputs)

  return launch


def scfa_case(name: str, q, k, v, do) -> None:
  """Forward and backward of one benchmark case (the benchmark's masks and buckets)."""
  b, t, n, h = q.shape
  _, q_masks, k_masks, _ = make_case(name, b, t, n, seed=t)
  tokens = sort_tokens(CASES[name][0], q_masks, k_masks)
  config = core.AttentionConfig(implementation="triton", strict=False, scale=h**-0.5)
  o, residuals = triton_backend.forward(config, q, k, v, tokens, differentiating=True)
  dq, dk, dv = triton_backend.backward(config, q, k, v, tokens, o, residuals, do)
  for x_name, x in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
    if not bool(jnp.isfinite(x.astype(jnp.float32)).all()):
      raise RuntimeError(f"{name}: {x_name} is not finite")


def torch_dense(backend: str, q, k, v, do, cache: dict) -> None:
  """PyTorch's dense causal attention, forward and backward, on one SDPA backend."""
  import torch  # noqa: PLC0415
  from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

  qt, kt, vt, dot = (_to_torch(x, cache).transpose(1, 2).requires_grad_(x is not do) for x in (q, k, v, do))
  with sdpa_kernel(getattr(SDPBackend, backend)):
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    out.backward(dot)
  torch.cuda.synchronize()


# What the summary keeps of ncu's raw page, per kernel.
METRICS = {
    "ms": "gpu__time_duration.sum",
    "tensor_pipe_pct": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "issue_active_pct": "sm__issue_active.avg.pct_of_peak_sustained_elapsed",
    "dram_pct": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram_tb_per_s": "dram__bytes.sum.per_second",
    "l2_hit_pct": "lts__t_sector_hit_rate.pct",
    "warps_active_per_sm": "sm__warps_active.avg.per_cycle_active",
    "registers": "launch__registers_per_thread",
    "shared_bytes": "launch__shared_mem_per_block",
    "programs_per_sm_by_registers": "launch__occupancy_limit_registers",
}
STALL_PREFIX = "smsp__average_warps_issue_stalled_"


def summarize(path: str, cases: list[str]) -> list[dict]:
  """One row per profiled kernel of `ncu --page raw --csv`: METRICS and the warp stall
  reasons (warps stalled per issued instruction, largest first). SCFA kernels are labelled
  with their case: each case's launches start with its plan kernels."""
  with open(path) as f:
    header, _units, *lines = csv.reader(line for line in f if not line.startswith("=="))
  labels = iter(cases)
  case, rows, previous = None, [], ""
  for line in lines:
    raw = dict(zip(header, line, strict=True))
    name = raw["Kernel Name"]
    if name.startswith("scfa_plan") and not previous.startswith("scfa_plan"):
      case = next(labels)
    elif not name.startswith("scfa_"):
      case = "cudnn" if "cudnn" in name else "flash2" if "flash" in name else "other"
    previous = name
    number = {key: float(value.replace(",", "")) for key, value in raw.items() if key in METRICS.values()}
    number |= {key[len(STALL_PREFIX):].split("_per_issue")[0]: float(value) for key, value in raw.items()
               if key.startswith(STALL_PREFIX)}  # fmt: skip
    row = {"case": case, "kernel": name[:80], **{key: number[metric] for key, metric in METRICS.items()}}
    stalls = {key: value for key, value in number.items() if key not in METRICS.values()}
    row["stalls_per_issue"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1])[:8])
    rows.append(row)
  return rows


def summarize_source(path: str, top: int = 12) -> list[dict]:
  """Per kernel of `ncu --page source --print-source sass --csv`: the SASS instructions with
  the most warp stall samples (share of the kernel's samples, main reasons) and the shares
  by opcode."""
  samples, kernels = "Warp Stall Sampling (All Samples)", []
  with open(path) as f:
    sections = f.read().split('"Kernel Name",')[1:]
  for section in sections:
    name, body = section.split("\n", 1)
    header, *lines = csv.reader(body.splitlines())
    rows = [dict(zip(header, line, strict=True)) for line in lines if len(line) == len(header)]
    total = sum(float(r[samples] or 0) for r in rows)
    reasons = [c for c in header if c.startswith("stall_") and "Not Issued" not in c]
    hot = []
    for i, r in sorted(enumerate(rows), key=lambda ir: -float(ir[1][samples] or 0))[:top]:
      stalls = sorted(((float(r[c] or 0), c[len("stall_"):]) for c in reasons), reverse=True)[:2]
      hot.append({"index": i, "sass": r["Source"].strip(), "share": float(r[samples]) / total,
                  "reasons": {reason: count / float(r[samples]) for count, reason in stalls}})  # fmt: skip
    by_opcode: dict[str, float] = {}
    for r in rows:
      words = [w for w in r["Source"].split() if not w.startswith("@")]
      opcode = words[0].split(".")[0] if words else ""
      by_opcode[opcode] = by_opcode.get(opcode, 0.0) + float(r[samples] or 0) / total
    ranked = dict(sorted(by_opcode.items(), key=lambda kv: -kv[1])[:top])
    kernels.append({"kernel": name.split(",")[0].strip('"'), "instructions": len(rows), "hot": hot, "by_opcode": ranked})
  return kernels


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="all,hash16,hash64,drop70")
  parser.add_argument("--dense", default="CUDNN_ATTENTION,FLASH_ATTENTION", help="torch SDPA backends, or ''")
  parser.add_argument("--seq_len", type=int, default=16384)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=48)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--summarize", default="", help="only summarize this `ncu --page raw --csv` file")
  parser.add_argument("--summarize_source", default="", help="only summarize this `--page source` CSV")
  parser.add_argument("--out", default="", help="with --summarize or --summarize_source: the JSON to write")
  args = parser.parse_args()
  cases = [c for c in args.cases.split(",") if c]
  dense = [d for d in args.dense.split(",") if d]
  if args.summarize or args.summarize_source:
    what = f"ncu --page {'raw' if args.summarize else 'source'} of {args.summarize or args.summarize_source}"
    kernels = summarize(args.summarize, cases) if args.summarize else summarize_source(args.summarize_source)
    result = {"what": what, "cases": cases, "seq_len": args.seq_len, "batch": args.batch, "heads": args.heads,
              "head_dim": args.head_dim, "kernels": kernels}  # fmt: skip
    text = json.dumps(result, indent=1)
    if args.out:
      Path(args.out).write_text(text + "\n")
    print(text)
    return
  import torch  # noqa: PLC0415

  shape = (args.batch, args.seq_len, args.heads, args.head_dim)
  q, k, v, do = (jax.random.normal(jax.random.PRNGKey(i), shape, jnp.bfloat16) for i in range(4))
  cache: dict = {}
  triton_backend._launch = torch_launcher(cache)
  for name in cases:  # compiles every kernel first, outside the profiled range
    scfa_case(name, q, k, v, do)
  for backend in dense:
    torch_dense(backend, q, k, v, do, cache)
  profiling = torch.cuda.is_available()
  if profiling:
    torch.cuda.cudart().cudaProfilerStart()
  for name in cases:
    print("profiling", name, flush=True)
    scfa_case(name, q, k, v, do)
  for backend in dense:
    print("profiling", backend, flush=True)
    torch_dense(backend, q, k, v, do, cache)
  if profiling:
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
  main()
