"""The main demo: a small hash-attention GPT on the standard library's source (~5 min, 2 CPU cores)."""

from scfa_jax.model import preset
from scfa_jax.train import TrainConfig

CONFIGS = {
    # 0.79M parameters (4 layers, 2 heads of 64), T=256, 8 buckets per head,
    # 1000 steps of 8 x 256 bytes (2M tokens); many small steps learn fastest here.
    "stdlib_demo": TrainConfig(
        model=preset("cpu_small", attention="hash", num_buckets=8),
        batch_size=8,
        steps=1000,
        lr=2e-3,
        eval_every=100,
        eval_batches=16,
        log_every=10,
        checkpoint_every=100,
        out_dir="runs/stdlib_demo",
    ),
    # The same model with dense causal attention, for comparison.
    "stdlib_demo_dense": TrainConfig(
        model=preset("cpu_small", attention="dense"),
        batch_size=8,
        steps=1000,
        lr=2e-3,
        checkpoint_every=100,
        out_dir="runs/stdlib_demo_dense",
    ),
}
