"""The main demo: a small hash-attention GPT on the standard library's source, ~5 min on 2 CPU cores."""

from scfa_jax.model import preset
from scfa_jax.train import TrainConfig

CONFIGS = {
    # 3.0M parameters, T=256, 16 buckets, 300 steps of 16 x 256 bytes (1.2M tokens).
    "stdlib_demo": TrainConfig(
        model=preset("cpu_small", attention="hash", num_buckets=16),
        batch_size=16,
        steps=300,
        eval_every=50,
        eval_batches=8,
        log_every=10,
        checkpoint_every=50,
        out_dir="runs/stdlib_demo",
    ),
    # The same model with dense causal attention, for comparison.
    "stdlib_demo_dense": TrainConfig(
        model=preset("cpu_small", attention="dense"),
        batch_size=16,
        steps=300,
        checkpoint_every=50,
        out_dir="runs/stdlib_demo_dense",
    ),
}
