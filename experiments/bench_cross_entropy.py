"""Loss and gradient of the GPT's tied logits: float32 logits with Optax's cross-entropy
against `model.tied_cross_entropy` (bf16 logits, float32 log-sum-exp, one-pass backward).

    python experiments/bench_cross_entropy.py --seq_len=8192 --out=cross_entropy.json

Times jit(value_and_grad) in x [B, T, D] and the embedding [V, D] (bf16) at the 122M GPT's
shape, best of 5 rounds of 10 calls, and prints one JSON line (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from experiments.bench_model import versions  # noqa: E402
from scfa_jax.model import tied_cross_entropy, tied_logits  # noqa: E402


def best_ms(fn, *args, rounds: int = 5, calls: int = 10) -> tuple[float, jax.Array]:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls * 1e3)
  return min(times), out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=8192)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--vocab_size", type=int, default=50304)
  parser.add_argument("--out", default=None, help="JSON path")
  args = parser.parse_args()
  kx, kw, kt = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (args.batch, args.seq_len, args.width), jnp.bfloat16)
  embedding = (0.02 * jax.random.normal(kw, (args.vocab_size, args.width))).astype(jnp.bfloat16)
  targets = jax.random.randint(kt, (args.batch, args.seq_len), 0, args.vocab_size)

  def float32_logits(x, embedding):
    return optax.softmax_cross_entropy_with_integer_labels(tied_logits(x, embedding), targets).mean()

  def fused(x, embedding):
    return tied_cross_entropy(x, embedding, targets).mean()

  result = {"versions": versions(), "args": vars(args)}
  for name, loss in (("f32_logits_optax", float32_logits), ("tied_cross_entropy", fused)):
    ms, (value, _) = best_ms(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), x, embedding)
    result[name] = {"ms": ms, "loss": float(value)}
  print(json.dumps(result))
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
