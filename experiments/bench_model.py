"""Training speed of the paper's 122M shared-QK GPT per attention mode, with its baselines.

    python experiments/bench_model.py                                  # T=8192 x 4, T=16384 x 2
    python experiments/bench_model.py --cases=32768x1,65536x1 --modes=dense,hash16,no_attention --remat
    python experiments/bench_model.py --profile=8192x4:dense,hash16 --out=bench.json

Times whole optimizer steps of `scfa_jax.train.Trainer` (AdamW, bf16 matmuls, float32
params, data sampling included) after warm-up, for each case T x batch and mode:

  dense           cuDNN causal attention (jax.nn.dot_product_attention): the baseline
  hash8/16/32     hash-sparse attention with that many buckets
  hash16_plain    hash-16 with the paper's LSH of raw queries (center_hash=False)
  drop30/50/70    QK-dropping at that rate
  no_attention    the same model with the attention core replaced by out = q + k + v (free,
                  but it reads its inputs, so the projections and rotary positions that feed
                  it stay; LSH-free): the step that attention costing nothing would leave,
                  whose speed-up over dense is the ceiling of any attention mode (Amdahl)
  plain_dense     the same architecture and step written in plain JAX (no Flax, no
                  library code): the bar for the dense model's own overhead

Each row reports step ms, tokens/s, the speed-up over dense, the ceiling and the
fraction of it reached (speed-up / ceiling), compile time, the compiled step's memory
(XLA's memory analysis), the losses of every step and, in hash modes, the balance of the
buckets the timed model gives one batch. The steps are the first of a 10,000-step schedule
(inside its warm-up), as a real run's would be. With --data (a prepared folder) the steps
read that corpus, so the losses of two versions of the code can be compared; with a byte
corpus, --vocab_size=257 makes the model of the quality comparison (experiments/configs/
quality.py) instead of the paper's 50304-token vocabulary fed only bytes.

The GPT has rotary positions (--positions=learned for the paper's position table). The
choice changes what hash attention costs: with the table, equal bytes (runs of spaces)
give nearly equal queries, and within the first 50 steps of training the byte-level
model's buckets hold a sum of squared bucket shares of 0.14-0.17, 0.16-0.18 by step 100
(0.07 at initialisation, 0.0625 for uniform buckets); with rotary positions 0.09-0.10
(experiments/bucket_balance.py, docs/performance.md). Hash attention computes about that
share of the causal pairs.

--profile adds, for the given cases, a breakdown of one step's GPU time by part of the
model: jax.profiler traces each kernel to its HLO instruction, whose op_name carries the
model's named scopes (embedding, layer_norm, qkv_projection, lsh, attention_core,
scfa_sort, mlp, logits, cross_entropy, optimizer); kernels of no scope go by name
(copies and transposes, the rest "other"), and wall time not covered by any kernel is
"host_gaps". Kernels that ran inside XLA's command buffers are matched to instructions by
their kernel names, which can point at the wrong instruction (the logits' 2 ms reduction
has been filed under the LSH): --no_command_buffers gives each kernel its own.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.configs.modes import MODES as ATTENTION_MODES  # noqa: E402
from scfa_jax import train  # noqa: E402
from scfa_jax.data import batches, prepared  # noqa: E402
from scfa_jax import nn  # noqa: E402
from scfa_jax.model import GPT, ROPE_BASE, GPTConfig, count_params, preset  # noqa: E402
from scfa_jax.nn import SparseCausalSelfAttention  # noqa: E402

MODES = {
    **ATTENTION_MODES,
    "no_attention": {"attention": "dense"},  # its layers' core is swapped for out = q + k + v (_FreeCore)
    "plain_dense": {"attention": "dense"},  # the architecture, not this model (_PlainDenseStep)
}


def versions() -> dict:
  info = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "triton", "jax-triton"):
    try:
      info[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      info[name] = None
  device = jax.devices()[0]
  info["device"] = f"{device.platform}:{getattr(device, 'device_kind', '?')} x{jax.device_count()}"
  try:
    info["driver"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout.strip().splitlines()[0]  # fmt: skip
  except Exception:  # noqa: BLE001  (no GPU, or no nvidia-smi)
    info["driver"] = None
  info["commit"] = train.source_commit()
  return info


# ----------------------------------------------------------------------------- the steps


class _FreeCore(SparseCausalSelfAttention):
  """The layer with its attention core replaced by out = q + k + v (the no_attention
  baseline): a core that costs nothing but reads q, k and v. With out = v, XLA removed the
  query projection (forward and backward) and the rotary positions as dead code, and the
  ceiling was that of a model without them."""

  def _dense(self, q, k, v, segment_ids=None):
    return q + k + v


def _memory_gib(compiled) -> float | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  total = (
      analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
      + analysis.temp_size_in_bytes
  )  # fmt: skip
  return total / 2**30


class _TrainerStep:
  """One mode's step on the project's Trainer: __call__ runs one optimizer step."""

  def __init__(self, model_config: GPTConfig, batch: int, schedule_steps: int, tokens: np.ndarray, mode: str):
    config = train.TrainConfig(
        model=model_config, batch_size=batch, steps=schedule_steps, checkpoint_every=0,
        segment_documents=False,  # dense attention has no fast document mask: all modes attend one stream
    )  # fmt: skip
    model = None
    if mode == "no_attention":
      model = GPT(model_config, rngs=nnx.Rngs(params=config.seed))
      for block in model.blocks:
        block.attn.__class__ = _FreeCore
    self.trainer = train.Trainer.create(config, model=model)
    self.tokens = tokens
    self.param_count = count_params(self.trainer.model())

  def compiled(self):
    return self.trainer.compiled_step()

  def __call__(self):
    return self.trainer.train_step(self.tokens)


def _layer_norm(x, scale):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale


class _PlainDenseStep:
  """The same architecture and training step in plain JAX: a dict of arrays, einsums,
  cuDNN attention on bf16, float32 params and residual stream, bf16 logits upcast for
  the loss, the same Optax AdamW. What a plain-JAX user would write."""

  def __init__(self, c: GPTConfig, batch: int, schedule_steps: int, tokens: np.ndarray, seed: int = 0):
    d, n, h, f = c.n_embd, c.n_head, c.n_embd // c.n_head, 4 * c.n_embd
    keys = iter(jax.random.split(jax.random.key(seed), 2 + 5 * c.n_layer))
    normal = lambda shape, std=c.init_std: std * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    residual_std = c.init_std / math.sqrt(2 * c.n_layer)
    params = {
        "wte": normal((c.vocab_size, d)), "ln_f": jnp.ones(d),
        "blocks": [
            {"ln1": jnp.ones(d), "wq": normal((d, n, h)), "wv": normal((d, n, h)),
             "wo": normal((n, h, d), residual_std), "ln2": jnp.ones(d), "w_in": normal((d, f)),
             "w_out": normal((f, d), residual_std)}
            for _ in range(c.n_layer)
        ],
    }  # fmt: skip
    rope = c.positions == "rope"
    if not rope:
      params["wpe"] = normal((c.block_size, d))
    dtype = jnp.dtype(c.compute_dtype)
    attention = "cudnn" if jax.default_backend() == "gpu" else "xla"
    tx = train.optimizer(train.TrainConfig(model=c, batch_size=batch, steps=schedule_steps))
    self.params, self.opt_state = params, tx.init(params)
    self.tokens, self.batch, self.length = tokens, batch, c.block_size
    self.count = 0

    def loss_fn(p, windows):
      x = p["wte"][windows[:, :-1]] + (0.0 if rope else p["wpe"][: c.block_size])
      cast = lambda a: a.astype(dtype)  # noqa: E731
      positions = jnp.arange(c.block_size)
      for blk in p["blocks"]:
        hdn = cast(_layer_norm(x, blk["ln1"]))
        q = jnp.einsum("btd,dnh->btnh", hdn, cast(blk["wq"]))
        q = nn.rope(q, positions, ROPE_BASE) if rope else q
        v = jnp.einsum("btd,dnh->btnh", hdn, cast(blk["wv"]))
        k = cast(q.astype(jnp.float32) / jnp.linalg.norm(q.astype(jnp.float32), axis=-1, keepdims=True))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attention)
        x = x + jnp.einsum("btnh,nhd->btd", o, cast(blk["wo"])).astype(jnp.float32)
        hdn = cast(_layer_norm(x, blk["ln2"]))
        mlp = jnp.einsum("btf,fd->btd", jax.nn.gelu(jnp.einsum("btd,df->btf", hdn, cast(blk["w_in"]))),
                         cast(blk["w_out"]))  # fmt: skip
        x = x + mlp.astype(jnp.float32)
      logits = jnp.einsum("btd,vd->btv", cast(_layer_norm(x, p["ln_f"])), cast(p["wte"])).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

    def step(p, opt_state, windows):
      loss, grads = jax.value_and_grad(loss_fn)(p, windows)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, loss

    self._jit = jax.jit(step, donate_argnums=(0, 1))
    self._compiled = None
    self.param_count = sum(x.size for x in jax.tree.leaves(params))

  def _windows(self):
    return batches.train_batch(self.tokens, seed=0, step=self.count, shape=(self.batch,), length=self.length)

  def compiled(self):
    if self._compiled is None:
      self._compiled = self._jit.lower(self.params, self.opt_state, self._windows()).compile()
    return self._compiled

  def __call__(self):
    self.params, self.opt_state, loss = self.compiled()(self.params, self.opt_state, self._windows())
    self.count += 1
    return loss


SCHEDULE_STEPS = 10_000
"""The learning-rate schedule's length: the timed steps are the first of a long run, still in
its warm-up (200 steps), as a real run's would be; a schedule as short as the benchmark
would reach the peak rate at once, and the loss spikes that follow change what the model's
LSH buckets look like."""


def make_step(mode: str, length: int, batch: int, schedule_steps: int, tokens, *, remat: bool, preset_name: str,
              **model_fields):  # fmt: skip
  model_config = preset(preset_name, block_size=length, remat=remat, **model_fields, **MODES[mode])
  if mode == "plain_dense":
    if remat:
      raise ValueError("plain_dense has no remat; leave plain_dense out of --modes with --remat")
    return _PlainDenseStep(model_config, batch, schedule_steps, tokens)
  return _TrainerStep(model_config, batch, schedule_steps, tokens, mode)


def bucket_summary(step) -> dict | None:
  """Hash modes: the buckets of the timed model on one batch of its data, averaged over layers."""
  trainer = getattr(step, "trainer", None)
  if trainer is None or trainer.config.model.attention != "hash":
    return None
  c = trainer.config
  windows = batches.train_batch(step.tokens, seed=c.seed, step=0, shape=(c.micro_batch,), length=c.model.block_size)
  layers = trainer.bucket_balance(windows)
  return {
      "pair_share": float(np.mean([x["pair_share"] for x in layers])),
      "max_over_mean": float(np.mean([x["max_over_mean"] for x in layers])),
      "worst_layer_pair_share": float(max(x["pair_share"] for x in layers)),
  }


# ----------------------------------------------------------------------------- timing


def bench_case(length, batch, mode, *, steps, warmup, remat, preset_name, tokens, **model_fields) -> dict:
  step = make_step(mode, length, batch, SCHEDULE_STEPS, tokens, remat=remat, preset_name=preset_name, **model_fields)
  t0 = time.perf_counter()
  compiled = step.compiled()
  compile_s = time.perf_counter() - t0
  losses = [step() for _ in range(warmup)]
  jax.block_until_ready(losses)
  t0 = time.perf_counter()
  losses += [step() for _ in range(steps)]
  jax.block_until_ready(losses)
  step_s = (time.perf_counter() - t0) / steps
  return {
      "T": length, "batch": batch, "mode": mode, "step_ms": 1e3 * step_s, "tokens_per_s": batch * length / step_s,
      "compile_s": compile_s, "memory_gib": _memory_gib(compiled), "remat": remat,
      "losses": [float(x) for x in jax.device_get(losses)], "params": step.param_count,
      "buckets": bucket_summary(step),
  }, step  # fmt: skip


def add_ratios(rows: list[dict]) -> None:
  """speedup_vs_dense, ceiling (dense over no_attention) and fraction_of_ceiling, per case."""
  for row in rows:
    same = {r["mode"]: r for r in rows if (r["T"], r["batch"]) == (row["T"], row["batch"]) and "error" not in r}
    if "error" in row or "dense" not in same:
      continue
    dense = same["dense"]["tokens_per_s"]
    row["speedup_vs_dense"] = row["tokens_per_s"] / dense
    if "no_attention" in same:
      row["ceiling"] = same["no_attention"]["tokens_per_s"] / dense
      row["fraction_of_ceiling"] = row["speedup_vs_dense"] / row["ceiling"]


# ----------------------------------------------------------------------------- profile

CATEGORIES = (
    # (category, what to match, pattern): the first match wins, so inner scopes come before
    # outer ones. Scopes match path components of the kernel's op_names ("attention_core" in
    # ".../transpose(jvp(attention_core))/..."), kernel patterns the kernel's own name.
    ("tile_plan", "kernel", r"scfa_plan"),
    ("sort", "kernel", r"cub::|[Rr]adix|[Ss]ort"),
    ("sort", "scope", r"scfa_sort"),
    ("lsh", "scope", r"lsh"),
    ("attention_kernels", "scope", r"attention_core"),
    ("attention_kernels", "kernel", r"scfa_|cudnn|fmha|flash"),
    ("qkv_out_projections", "scope", r"qkv_projection|out_projection"),
    ("mlp", "scope", r"mlp"),
    ("layer_norm", "scope", r"layer_norm"),
    ("embedding", "scope", r"embedding"),
    ("logits_cross_entropy", "scope", r"logits|cross_entropy"),
    ("optimizer", "scope", r"optimizer"),
    ("copies_transposes", "kernel", r"copy|transpose"),
    # cuBLAS kernels that XLA launched inside a command buffer carry no instruction of their
    # own in the trace; --no_command_buffers gives each its instruction, so its scope.
    ("unattributed_matmuls", "kernel", r"nvjet|gemm|xmma|cutlass"),
)


def category(op_names: str, kernel: str) -> str:
  for name, kind, pattern in CATEGORIES:
    if kind == "kernel" and re.search(pattern, kernel):
      return name
    if kind == "scope" and re.search(rf"(?:^|[/( ])(?:{pattern})(?:[/) ]|$)", op_names):
      return name
  return "other"


_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->.*)?\{\s*$")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> the op_names (named-scope paths) it stands for, joined by spaces:
  its own metadata, and for a fusion that of every instruction of the computation it calls."""
  own, calls, inside, current = {}, {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    name = _NAME.match(line)
    if not name:
      computation = _COMPUTATION.match(line)
      if computation:
        current = computation.group(1)
      continue
    op_name = _OP_NAME.search(line)
    op_name = op_name.group(1) if op_name else ""
    own[name.group(1)] = op_name
    called = _CALLS.search(line)
    if called:
      calls[name.group(1)] = called.group(1)
    if current and op_name:
      inside[current].append(op_name)
  return {name: " ".join([own[name], *inside.get(calls.get(name, ""), [])]) for name in own}


def op_names_of(event: dict, names: dict[str, str]) -> str:
  """The op_names of a traced kernel: through its HLO instruction, or for a fusion kernel
  that ran inside a command buffer (whose events name the buffer), through its own name,
  which is the fusion's with '.' written '_' ("loop_add_fusion_12" is "loop_add_fusion.12")."""
  found = names.get(event["args"].get("hlo_op", ""))
  if found:
    return found
  kernel = event["name"]
  return names.get(re.sub(r"_(\d+)$", r".\1", kernel)) or names.get(kernel, "")


def _perfetto_events(folder: str) -> tuple[list[dict], dict[int, str]]:
  paths = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
  if not paths:
    raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {folder}")
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  processes = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M"
               and e.get("name") == "process_name"}  # fmt: skip
  return [e for e in events if e.get("ph") == "X"], processes


def profile_step(step, steps: int = 3, keep: Path | None = None) -> dict:
  """GPU (or, without one, XLA CPU) time of one step per category, from a jax.profiler trace.
  keep: a folder to copy the trace and the compiled HLO into, for a closer look."""
  hlo = step.compiled().as_text()
  names = hlo_op_names(hlo)
  jax.block_until_ready(step())
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      start = time.perf_counter()
      losses = [step() for _ in range(steps)]
      jax.block_until_ready(losses)
      wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events, processes = _perfetto_events(folder)
    if keep is not None:
      keep.mkdir(parents=True, exist_ok=True)
      for path in glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True):
        Path(keep / "trace.json.gz").write_bytes(Path(path).read_bytes())
      with gzip.open(keep / "hlo.txt.gz", "wt") as f:
        f.write(hlo)
  on_device = [e for e in events if "/device:GPU" in processes.get(e["pid"], "")]
  ops = [e for e in (on_device or events) if "hlo_op" in e.get("args", {})]
  per_category, per_kernel = collections.Counter(), collections.Counter()
  intervals = []
  for e in ops:
    label = category(op_names_of(e, names), e["name"])
    per_category[label] += e["dur"] / 1e3 / steps
    per_kernel[(label, e["name"][:90])] += e["dur"] / 1e3 / steps
    intervals.append((e["ts"], e["ts"] + e["dur"]))
  busy, end = 0.0, -math.inf
  for lo, hi in sorted(intervals):  # the union of kernel intervals: time the device was busy
    busy += max(0.0, hi - max(lo, end))
    end = max(end, hi)
  busy_ms = busy / 1e3 / steps
  return {
      "wall_ms": wall_ms, "busy_ms": busy_ms, "host_gaps_ms": max(0.0, wall_ms - busy_ms),
      "by_category_ms": dict(per_category.most_common()), "device_events": len(on_device), "op_events": len(ops),
      "top_kernels": [[label, name, ms] for (label, name), ms in per_kernel.most_common(25)],
      "unmatched_kernels": sorted({e["name"][:60] for e in ops if not op_names_of(e, names)})[:20],
      "sample_args": [e.get("args") for e in on_device[:3]],
  }  # fmt: skip


# ----------------------------------------------------------------------------- main


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for mode in dict.fromkeys(r["mode"] for r in rows if "error" not in r):
    points = sorted((r["T"], r["tokens_per_s"]) for r in rows if r["mode"] == mode and "error" not in r)
    style = dict(linestyle="--", color="k") if mode == "no_attention" else {}
    label = "no attention (the ceiling)" if mode == "no_attention" else mode
    ax.plot(*zip(*points, strict=True), marker="" if style else "o", label=label, **style)
  ax.set(xscale="log", xlabel="sequence length T", ylabel="tokens / s", title="122M GPT, one training step")
  ax.minorticks_off()
  ax.set_xticks(sorted({r["T"] for r in rows}), [str(t) for t in sorted({r["T"] for r in rows})])
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _cases(text: str) -> list[tuple[int, int]]:
  return [tuple(int(x) for x in case.lower().split("x")) for case in text.split(",") if case]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default="8192x4,16384x2", help="comma-separated TxB")
  parser.add_argument("--modes", default="dense,hash16,no_attention,plain_dense", help=f"among {list(MODES)}")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  parser.add_argument("--vocab_size", type=int, default=None,
                      help="the model's vocabulary (default: the preset's); 257 for a byte corpus fits it exactly")  # fmt: skip
  parser.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass")
  parser.add_argument("--preset", default="gpt122m", help="GPT preset (cpu_tiny for a smoke test)")
  parser.add_argument("--positions", default="rope", choices=("rope", "learned"),
                      help="the GPT's positions: rotary, as the quality comparison trains it, or the paper's "
                      "learned table")  # fmt: skip
  parser.add_argument("--data", default=None, help="a prepared folder to read (default: random tokens)")
  parser.add_argument("--profile", default="", help="TxB:mode,mode;TxB:mode ... cases to profile")
  parser.add_argument("--profile_dir", type=Path, default=None, help="keep each profile's trace and HLO here")
  parser.add_argument("--no_command_buffers", action="store_true",
                      help="launch XLA's GPU kernels one by one (not as CUDA graphs), so that the profile can "
                      "attribute every cuBLAS matmul; changes the timings slightly")  # fmt: skip
  parser.add_argument("--out", default=None, help="JSON path (default results/bench_model_<platform>.json)")
  args = parser.parse_args()
  unknown = [m for m in args.modes.split(",") if m not in MODES]
  if unknown:
    parser.error(f"--modes: unknown {unknown}; known: {list(MODES)}")
  profile = {}
  for item in filter(None, args.profile.split(";")):
    case, _, modes = item.partition(":")
    profile[_cases(case)[0]] = modes.split(",")

  if args.no_command_buffers:  # before JAX starts its GPU backend
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer="
  info = versions()
  print(json.dumps(info), flush=True)
  out = Path(args.out or Path(__file__).parent / "results" / f"bench_model_{jax.default_backend()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)

  def write(rows):  # after every case, so that a run cut short keeps what it measured
    out.write_text(json.dumps({"versions": info, "args": vars(args), "results": rows}, indent=1, default=str) + "\n")

  model_fields = {"positions": args.positions}
  if args.vocab_size is not None:
    model_fields["vocab_size"] = args.vocab_size
  vocab = preset(args.preset, **model_fields).vocab_size
  if args.data:
    tokens = prepared.load(args.data)[0]["train"]
    if int(tokens.max()) >= vocab:
      parser.error(f"--data has token ids up to {int(tokens.max())}, past the model's vocab_size={vocab}")
  else:
    tokens = np.random.default_rng(0).integers(0, vocab, size=2**24, dtype=np.uint16)
  rows = []
  for length, batch in _cases(args.cases):
    modes = list(dict.fromkeys(args.modes.split(",") + profile.get((length, batch), [])))
    for mode in modes:
      try:
        row, step = bench_case(length, batch, mode, steps=args.steps, warmup=args.warmup, remat=args.remat,
                               preset_name=args.preset, tokens=tokens, **model_fields)  # fmt: skip
        if mode in profile.get((length, batch), []):
          try:
            keep = args.profile_dir / f"{length}x{batch}_{mode}" if args.profile_dir else None
            row["profile"] = profile_step(step, keep=keep)
          except Exception as e:  # noqa: BLE001  (a profiler that fails must not lose the timing)
            row["profile"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        del step
      except Exception as e:  # noqa: BLE001  (e.g. out of memory: record it and go on)
        row = {"T": length, "batch": batch, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:400]}"}
      rows.append(row)
      print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "profile")}), flush=True)
      write(rows)
  add_ratios(rows)
  write(rows)

  print(f"\n{'T':>6} {'B':>2} {'mode':>13} {'step ms':>8} {'tokens/s':>9} {'vs dense':>8} {'ceiling':>7} "
        f"{'of ceil.':>8} {'compile s':>9} {'GiB':>5}")  # fmt: skip
  for row in rows:
    if "error" in row:
      print(f"{row['T']:>6} {row['batch']:>2} {row['mode']:>13}  {row['error'][:80]}")
      continue
    fmt = lambda key, spec: format(row[key], spec) if row.get(key) is not None else "-"  # noqa: E731
    print(
        f"{row['T']:>6} {row['batch']:>2} {row['mode']:>13} {row['step_ms']:>8.1f} {row['tokens_per_s']:>9,.0f} "
        f"{fmt('speedup_vs_dense', '.2f'):>8} {fmt('ceiling', '.2f'):>7} {fmt('fraction_of_ceiling', '.0%'):>8} "
        f"{row['compile_s']:>9.1f} {fmt('memory_gib', '.1f'):>5}"
    )
  for row in rows:
    if "profile" in row and "error" not in row["profile"]:
      p = row["profile"]
      parts = " ".join(f"{k}={v:.1f}" for k, v in p["by_category_ms"].items())
      print(f"profile T={row['T']} B={row['batch']} {row['mode']}: wall {p['wall_ms']:.1f} ms, busy "
            f"{p['busy_ms']:.1f}, host gaps {p['host_gaps_ms']:.1f} | {parts}")  # fmt: skip

  if len({r["T"] for r in rows}) > 1:
    plot(rows, out.with_suffix(".png"))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
