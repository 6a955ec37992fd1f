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

Packed documents (--documents=mixed): every batch row is filled with documents whose
lengths are drawn log-uniformly in [--doc_min, --doc_max] (seeded by --doc_seed and T, so
reruns see the same rows), the last one cut at T; a token's segment id is its document's
index in the row. Every case then gets q_segment_ids = k_segment_ids, and a query attends
only earlier keys of its own document ("all" is dense causal attention within documents).

  python experiments/bench_attention.py --documents=mixed --seq_lens=16384,32768 \
      --cases=all,hash16,drop50 --out=experiments/results/bench_attention_docs_h100.json

The dense baselines of packed rows, each timed in the same process:
  cudnn         `jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")` without
                the document mask: not the same work, kept to show what the mask costs cuDNN.
  cudnn_masked  the same call with `mask=` the [B, 1, T, T] bool same-document mask, built
                inside the timed function from the segment ids, as the layer's dense mode does.
                This is the baseline (speedup_masked_*): the only public jax path to document
                masking (jax.nn.dot_product_attention's query/key_value_seq_lengths give one
                length per row, not per document). cuDNN reads the mask as a dense bias in
                the compute dtype, B * T * T of it (8 GiB at B=4, T=32768 in bf16), and cannot
                skip the tiles between documents; jax 0.11.2 skips that bias's gradient,
                0.10.2 computes it too.
  cudnn_packed  cuDNN's packed layout (ragged offsets) through jax's private
                `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, with
                q/kv_seqlen [B, M] and q/kv_offsets [B, M + 1] (M, the most documents of a
                row, is static) and mask_type=PADDING_CAUSAL: each document is a causal
                sequence of its own, so there is no mask and no tile across documents. The
                fair dense rival of the segment ids, but private (Hopper or newer; with
                grouped-query k, v the offsets are right from jax 0.11.2 only, 0.10.2 scales
                them by the query heads): its forward is compared with cudnn_masked
                (cudnn_packed_max_abs_vs_masked), it runs last for each T, and its failure is
                recorded as cudnn_packed_error instead of ending the run (--no_cudnn_packed
                leaves it out).
Rows keep speedup_* over cudnn, as in unpacked files, and add speedup_masked_* and
speedup_packed_*; the "all" rows record max_abs_vs_masked, their distance to cudnn_masked.
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
    "model16": ("hash", 16),
    **{f"drop{int(r * 100)}": ("qk", r) for r in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)},
}
# Cases shaped as the 122M GPT's hash calls (shared-QK): one bucket array for queries and keys,
# strict causality (t > s), and bucket shares p_i ~ (i + 1) ** -exponent in a random order per
# head: 0.55 gives a sum of squared shares of 0.080 for 16 buckets, as the model's buckets at
# T=8192 (results/bench_model_rotary_h100.json, "buckets"), and a largest bucket 2.6x the mean.
SHARED_STRICT = {"model16": 0.55}
TIMINGS = ("fwd", "bwd", "fwd_bwd")


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


def _segments(seg) -> dict:
  """Keywords of the public functions for an optional trailing (q_segment_ids, k_segment_ids)."""
  if not seg:
    return {}
  q_segment_ids, k_segment_ids = seg
  return dict(q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids)


def key_masks(name, q_masks, k_masks):
  """The key side's masks as a case passes them: for SHARED_STRICT cases the query array itself,
  as the model's layer passes one bucket array, so that inside jit the tokens are sorted once
  and are `shared` (jit's arguments are distinct arrays even when the caller's are one)."""
  return q_masks if name in SHARED_STRICT else k_masks


def case_function(name):
  """The public function of a case as fn(q, k, v, q_masks, k_masks) or, for packed documents,
  fn(q, k, v, q_masks, k_masks, q_segment_ids, k_segment_ids)."""
  if CASES[name][0] == "hash":
    return lambda q, k, v, qm, km, *seg: scfa_jax.hash_sparse_attention(
        q, k, v, q_buckets=qm, k_buckets=key_masks(name, qm, km), strict=name in SHARED_STRICT, **_segments(seg)
    )
  return lambda q, k, v, qm, km, *seg: scfa_jax.qk_sparse_attention(
      q, k, v, q_keep=qm, k_keep=km, **_segments(seg)
  )


def make_case(name, b, t, n, seed, kv_heads=None):
  """(attention fn, query masks [B, T, N], key masks [B, T, K], density); K = kv_heads or N.

  fn is case_function(name); density is the fraction of the allowed pairs that the case keeps."""
  mode, param = CASES[name]
  kv_heads = n if kv_heads is None else kv_heads
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  if name in SHARED_STRICT:
    if kv_heads != n:
      raise ValueError(f"case {name!r} shares one bucket array for queries and keys: it needs kv_heads = {n}, got {kv_heads}")
    shares = np.arange(1, param + 1, dtype=np.float64) ** -SHARED_STRICT[name]
    shares /= shares.sum()
    drawn = jax.random.categorical(k1, jnp.log(jnp.asarray(shares, jnp.float32)), shape=(b, t, n))
    order = jnp.argsort(jax.random.uniform(k2, (n, param)), axis=-1)  # which bucket id is the largest, per head
    q_masks = order[jnp.arange(n), drawn].astype(scfa_jax.lsh.bucket_dtype(param))
    return case_function(name), q_masks, q_masks, float(np.sum(shares**2))
  if mode == "hash":
    # In the dtype lsh_buckets gives for this many buckets (uint8), which sets the sort's key width.
    dtype = scfa_jax.lsh.bucket_dtype(param)
    q_masks = jax.random.randint(k1, (b, t, n), 0, param, dtype)
    k_masks = jax.random.randint(k2, (b, t, kv_heads), 0, param, dtype)
    density = 1.0 / param
  else:
    q_masks = jax.random.bernoulli(k1, 1.0 - param, (b, t, n))
    k_masks = jax.random.bernoulli(k2, 1.0 - param, (b, t, kv_heads))
    density = (1.0 - param) ** 2
  return case_function(name), q_masks, k_masks, density


def document_lengths(t: int, rows: int, *, doc_min: int = 512, doc_max: int = 8192, seed: int = 0) -> list:
  """Lengths of the documents packed into each of `rows` rows of t tokens: drawn log-uniformly
  in [doc_min, doc_max] (as many short as long ones per octave), the last of a row cut at t.
  The draw depends on (seed, t) only, and row r is the same for any number of rows."""
  if not 1 <= doc_min <= doc_max:
    raise ValueError(f"document lengths need 1 <= doc_min <= doc_max, got {doc_min=}, {doc_max=}")
  rng = np.random.default_rng([seed, t])
  out = []
  for _ in range(rows):
    lengths, left = [], t
    while left > 0:
      length = int(np.exp(rng.uniform(np.log(doc_min), np.log(doc_max + 1))))
      lengths.append(min(max(length, doc_min), doc_max, left))
      left -= lengths[-1]
    out.append(lengths)
  return out


def segment_ids(lengths: list) -> np.ndarray:
  """int32 [B, T]: each token's document index within its row."""
  return np.stack([np.repeat(np.arange(len(row), dtype=np.int32), row) for row in lengths])


def packed_offsets(lengths: list) -> tuple[np.ndarray, np.ndarray]:
  """cuDNN's packed layout of the rows: document lengths int32 [B, M] and starts int32
  [B, M + 1], -1 past a row's documents. M >= 2: with one column jax takes cuDNN's
  unpacked path, which reads lengths as [B]."""
  m = max(2, *(len(row) for row in lengths))
  seqlens = np.full((len(lengths), m), -1, np.int32)
  offsets = np.full((len(lengths), m + 1), -1, np.int32)
  for r, row in enumerate(lengths):
    seqlens[r, : len(row)] = row
    offsets[r, : len(row)] = np.cumsum([0, *row[:-1]])
  return seqlens, offsets


def dense_attention(kind: str, implementation: str = "cudnn"):
  """A dense baseline as fn(q, k, v, *extra) (see the module docstring): "causal" takes no
  extra, "masked" (q_segment_ids, k_segment_ids), "packed" (seqlens, offsets) of packed_offsets."""
  if kind == "causal":
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation
    )
  if kind == "masked":

    def masked(q, k, v, q_segment_ids, k_segment_ids):
      mask = (q_segment_ids[:, None, :, None] == k_segment_ids[:, None, None, :]) & (
          k_segment_ids[:, None, None, :] >= 0
      )
      return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)

    return masked
  if kind == "packed":
    # Private: jax.nn.dot_product_attention has no per-document lengths (one length per row at most).
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_sdpa  # noqa: PLC0415

    def packed(q, k, v, seqlens, offsets):
      return cudnn_sdpa.dot_product_attention(
          q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets, kv_offsets=offsets,
          scale=q.shape[-1] ** -0.5, mask_type=cudnn_sdpa.MaskType.PADDING_CAUSAL,
      )  # fmt: skip

    return packed
  raise ValueError(f"dense baseline must be causal, masked or packed, got {kind=}")


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


def max_abs_diff(a: jax.Array, b: jax.Array) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def packed_baseline(q, k, v, seqlens, offsets, reference, rep_ms: int) -> dict:
  """cudnn_packed_* timings and the forward's distance to the masked baseline's output, or
  cudnn_packed_error: the path is private, so its failure must not cost the run."""
  attention = dense_attention("packed")
  try:
    check = max_abs_diff(jax.jit(attention)(q, k, v, seqlens, offsets), reference)
    result = timings(attention, q, k, v, seqlens, offsets, rep_ms=rep_ms)
    result = {f"cudnn_packed_{key}": val for key, val in result.items()}
    return {**result, "cudnn_packed_max_abs_vs_masked": check}
  except Exception as e:  # noqa: BLE001
    return {"cudnn_packed_error": f"{type(e).__name__}: {e}"[:4000]}


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
  parser.add_argument(
      "--documents", default="off", choices=("off", "mixed"),
      help="mixed: rows packed with documents of log-uniform lengths in [doc_min, doc_max], with segment ids",
  )  # fmt: skip
  parser.add_argument("--doc_min", type=int, default=512, help="shortest document (--documents)")
  parser.add_argument("--doc_max", type=int, default=8192, help="longest document (--documents)")
  parser.add_argument("--doc_seed", type=int, default=0, help="seed of the document lengths, with T")
  parser.add_argument(
      "--no_cudnn_packed", action="store_true", help="--documents without the private packed-layout baseline"
  )
  parser.add_argument("--plot", default="", help="only draw the figure of this JSON result file")
  args = parser.parse_args()
  if args.plot:
    print("wrote", plot(args.plot))
    return

  b, n, h = args.batch, args.heads, args.head_dim
  kv_heads = args.kv_heads or n
  if n % kv_heads:
    parser.error(f"--kv_heads must divide --heads, got {kv_heads} and {n}")
  documents = args.documents != "off"
  if documents and not 1 <= args.doc_min <= args.doc_max:
    parser.error(f"need 1 <= --doc_min <= --doc_max, got {args.doc_min} and {args.doc_max}")
  dtype = jnp.dtype(args.dtype)
  info = versions()
  print(json.dumps(info))
  rows, layouts = [], {}
  for t in (int(x) for x in args.seq_lens.split(",")):
    q = jax.random.normal(jax.random.PRNGKey(0), (b, t, n, h), dtype)
    k, v = (jax.random.normal(jax.random.PRNGKey(i), (b, t, kv_heads, h), dtype) for i in (1, 2))
    # cuDNN takes k and v with fewer heads than q as grouped-query attention, as the functions do.
    start = time.perf_counter()
    base = timings(dense_attention("causal"), q, k, v, rep_ms=args.rep_ms)
    pairs = b * t * (t + 1) / 2  # causal query-key pairs of the batch
    print(f"T={t:6d} cudnn      fwd {base['fwd_ms']:8.3f}  bwd {base['bwd_ms']:8.3f}  fwd+bwd {base['fwd_bwd_ms']:8.3f} ms")
    seg = ()
    if documents:
      lengths = document_lengths(t, b, doc_min=args.doc_min, doc_max=args.doc_max, seed=args.doc_seed)
      seg = (jnp.asarray(segment_ids(lengths)),) * 2  # passed as arguments: as constants XLA folds the mask
      doc_pairs = sum(m * (m + 1) / 2 for row in lengths for m in row)
      layouts[str(t)] = dict(
          per_row=[dict(count=len(r), mean=float(np.mean(r)), min=min(r), max=max(r)) for r in lengths],
          pair_fraction=doc_pairs / pairs, lengths=lengths,
      )  # fmt: skip
      pairs = doc_pairs
      masked = timings(dense_attention("masked"), q, k, v, *seg, rep_ms=args.rep_ms)
      reference = jax.jit(dense_attention("masked"))(q, k, v, *seg)
      print(
          f"T={t:6d} cudnn+mask fwd {masked['fwd_ms']:8.3f}  bwd {masked['bwd_ms']:8.3f}  "
          f"fwd+bwd {masked['fwd_bwd_ms']:8.3f} ms   documents per row {[len(r) for r in lengths]}"
      )
    first = len(rows)
    for name in args.cases.split(","):
      fn, qm, km, density = make_case(name, b, t, n, seed=t, kv_heads=kv_heads)
      ours = timings(fn, q, k, v, qm, km, *seg, rep_ms=args.rep_ms)
      row = dict(T=t, case=name, density=density, **ours, **{f"cudnn_{key}": val for key, val in base.items()})
      for key in TIMINGS:
        row[f"speedup_{key}"] = base[f"{key}_ms"] / ours[f"{key}_ms"]
      if documents:
        row.update({f"cudnn_masked_{key}": val for key, val in masked.items()})
        for key in TIMINGS:
          row[f"speedup_masked_{key}"] = masked[f"{key}_ms"] / ours[f"{key}_ms"]
        if name == "all":  # the same attention as the masked baseline, to rounding
          row["max_abs_vs_masked"] = max_abs_diff(jax.jit(fn)(q, k, v, qm, km, *seg), reference)
      # Useful work: the allowed pairs that survive the sparsity, forward 2 matmuls + backward 5.
      row["useful_tflops_fwd_bwd"] = 4 * n * h * pairs * density * 3.5 / (ours["fwd_bwd_ms"] * 1e-3) / 1e12
      rows.append(row)
      if args.out:
        write(args.out, _result(args, info, kv_heads, rows, layouts))
      masked_speedup = f"  vs masked {row['speedup_masked_fwd_bwd']:5.2f}" if documents else ""
      print(
          f"T={t:6d} {name:10s} fwd {ours['fwd_ms']:8.3f}  bwd {ours['bwd_ms']:8.3f}  fwd+bwd {ours['fwd_bwd_ms']:8.3f} ms"
          f"   speedup fwd {row['speedup_fwd']:5.2f}  bwd {row['speedup_bwd']:5.2f}  fwd+bwd {row['speedup_fwd_bwd']:5.2f}"
          f"{masked_speedup}   useful {row['useful_tflops_fwd_bwd']:6.1f} TFLOP/s",
          flush=True,
      )
    # Last of its T: a private path that fails at run time may leave the GPU unusable after it.
    if documents and not args.no_cudnn_packed:
      seqlens, offsets = (jnp.asarray(x) for x in packed_offsets(lengths))
      packed = packed_baseline(q, k, v, seqlens, offsets, reference, args.rep_ms)
      for row in rows[first:]:
        row.update(packed)
        if "cudnn_packed_error" not in packed:
          for key in TIMINGS:
            row[f"speedup_packed_{key}"] = packed[f"cudnn_packed_{key}_ms"] / row[f"{key}_ms"]
      if args.out:
        write(args.out, _result(args, info, kv_heads, rows, layouts))
      if "cudnn_packed_error" in packed:
        print(f"T={t:6d} cudnn packed layout failed: {packed['cudnn_packed_error'][:500]}", flush=True)
      else:
        print(
            f"T={t:6d} cudnn+pack fwd {packed['cudnn_packed_fwd_ms']:8.3f}  "
            f"bwd {packed['cudnn_packed_bwd_ms']:8.3f}  "
            f"fwd+bwd {packed['cudnn_packed_fwd_bwd_ms']:8.3f} ms   "
            f"max |out - masked| {packed['cudnn_packed_max_abs_vs_masked']:.3g}   fwd+bwd speedups "
            + "  ".join(f"{r['case']} {r['speedup_packed_fwd_bwd']:5.2f}" for r in rows[first:]),
            flush=True,
        )
    print(f"  (T={t} took {time.perf_counter() - start:.0f} s)", flush=True)
  if args.out:
    print("wrote", args.out)


def _result(args, info: dict, kv_heads: int, rows: list, layouts: dict) -> dict:
  """The JSON of a run; packed-document runs add their flags and each T's document lengths."""
  shape = dict(batch=args.batch, heads=args.heads, kv_heads=kv_heads, head_dim=args.head_dim)
  shape["dtype"] = args.dtype
  if args.documents == "off":
    return dict(versions=info, **shape, rows=rows)
  documents = dict(
      kind=args.documents, doc_min=args.doc_min, doc_max=args.doc_max, doc_seed=args.doc_seed,
      baseline="cudnn_masked (speedup_masked_*); cudnn_packed: private packed layout; cudnn: no mask",
      layouts=layouts,
  )  # fmt: skip
  return dict(versions=info, **shape, flags=vars(args), documents=documents, rows=rows)


def write(path: str, result: dict) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=1)


def plot(path: str) -> str:
  """Runtime vs T (log-log) per case with the cuDNN line, and fwd+bwd speedup per case; a PNG next to path.

  Packed-document files: the cuDNN lines with the document mask and the packed layout too,
  and the speedups over the masked baseline (x: over the packed layout, where it ran)."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  with open(path) as f:
    result = json.load(f)
  rows = sorted(result["rows"], key=lambda r: r["T"])
  documents = result.get("documents")
  cases = list(dict.fromkeys(r["case"] for r in rows))
  fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(13, 5))
  cudnn = {r["T"]: r["cudnn_fwd_bwd_ms"] for r in rows}
  label = "cuDNN dense causal, no document mask" if documents else "cuDNN dense causal"
  ax_time.plot(list(cudnn), list(cudnn.values()), "k--", marker="s", label=label)
  if documents:
    lines = (("cudnn_masked", "k-", "cuDNN + document mask"), ("cudnn_packed", "k:", "cuDNN packed layout"))
    for key, style, label in lines:
      line = {r["T"]: r[f"{key}_fwd_bwd_ms"] for r in rows if f"{key}_fwd_bwd_ms" in r}
      if line:
        ax_time.plot(list(line), list(line.values()), style, marker="s", label=label)
  for case in cases:
    mine = [r for r in rows if r["case"] == case]
    ax_time.plot([r["T"] for r in mine], [r["fwd_bwd_ms"] for r in mine], marker="o", label=f"SCFA {case}")
  ax_time.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="fwd+bwd ms (median)")
  ax_time.set_title("Runtime, whole public function vs cuDNN")
  ax_time.legend(fontsize=7)
  speedup = "speedup_masked_fwd_bwd" if documents else "speedup_fwd_bwd"
  lengths = sorted(cudnn)
  width = 0.8 / max(len(lengths), 1)
  for i, t in enumerate(lengths):
    at = [c + (i - (len(lengths) - 1) / 2) * width for c in range(len(cases))]
    speed = {r["case"]: r[speedup] for r in rows if r["T"] == t}
    ax_speed.bar(at, [speed.get(c, 0.0) for c in cases], width, label=f"T={t}")
    packed = {r["case"]: r.get("speedup_packed_fwd_bwd") for r in rows if r["T"] == t}
    shown = [(x, packed[c]) for x, c in zip(at, cases) if packed.get(c) is not None]
    if shown:
      ax_speed.plot(*zip(*shown), "kx")
  ax_speed.axhline(1.0, color="k", lw=0.8)
  ax_speed.set_xticks(range(len(cases)), cases, rotation=45)
  baseline = "cuDNN with document mask" if documents else "cuDNN"
  ax_speed.set(yscale="log", ylabel=f"{baseline} ms / SCFA ms (fwd+bwd)")
  ax_speed.set_title(f"Speedup over {baseline}" + (" (x: over cuDNN packed)" if documents else ""))
  ax_speed.legend(fontsize=7)
  v = result["versions"]
  kv_heads = result.get("kv_heads", result["heads"])  # files from before --kv_heads have none
  heads = f"N={result['heads']}" + (f" K={kv_heads}" if kv_heads != result["heads"] else "")
  docs = f", packed documents of {documents['doc_min']}-{documents['doc_max']} tokens" if documents else ""
  fig.suptitle(f"{v['device']}, B={result['batch']} {heads} H={result['head_dim']} {result['dtype']}{docs}")
  fig.tight_layout()
  out = path.rsplit(".", 1)[0] + ".png"
  fig.savefig(out, dpi=120)
  return out


if __name__ == "__main__":
  main()
