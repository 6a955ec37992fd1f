"""The paper's 122M shared-QK GPT (12 layers, 768 wide, 12 heads of 64) at T=8192, for GPUs.

Trains on the embedded stdlib corpus unless --data names a prepared folder (e.g. the
OpenWebText2 GPT-2 tokens written by the OpenWebText2 preparation script). 64 x 8192
tokens per step as 16 micro-batches of 4 sequences (per step, over all GPUs).
"""

import dataclasses

from scfa_jax.model import preset
from scfa_jax.train import TrainConfig

_BASE = TrainConfig(
    model=preset("gpt122m", attention="hash", num_buckets=16),
    batch_size=64,
    grad_accum=16,
    steps=15000,
    lr=1e-3,
    eval_every=500,
    eval_batches=16,
    log_every=10,
    checkpoint_every=500,
    sample_prompt="",
    out_dir="runs/gpt122m_hash16",
)

CONFIGS = {
    "gpt122m_hash16": _BASE,
    "gpt122m_dense": dataclasses.replace(
        _BASE, model=dataclasses.replace(_BASE.model, attention="dense"), out_dir="runs/gpt122m_dense"
    ),
}
