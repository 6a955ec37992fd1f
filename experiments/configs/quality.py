"""Sparse against dense attention, same model, data, order and seed: the quality comparison.

The paper's 12 x 768 shared-QK GPT on bytes (vocabulary 257; 78M parameters with rotary
positions) at T=8192, trained on this machine's Python sources (`--data=python`: the
standard library and site-packages, prepared on first use, or beforehand with
experiments/prepare_python.py), 2000 steps: about 3 minutes of training for dense on an H200
(400k tokens/s), so that each run fits one command of a few minutes. Every mode takes the
same batches in the same order and evaluates on the same fixed validation windows with fixed
attention randomness. Rotary positions: with the learned position table a dense run declined
slowly from 2.75 nats per byte at step 250 to 2.61 at step 1000
(experiments/results/quality_dense_1000steps_h100.jsonl); with rotary positions dense
reaches 1.23 in 2000 steps (docs/performance.md, "Model quality").

    python experiments/train_lm.py --config=quality_dense_8k    # F-LM: cuDNN dense attention
    python experiments/train_lm.py --config=quality_hash16_8k   # H-LM: hash-sparse, 16 buckets
    python experiments/train_lm.py --config=quality_drop30_8k   # D-LM: QK-dropping, rate 0.3
    (also quality_hash8_8k, quality_hash32_8k, quality_hash16_plain_8k: the paper's LSH of raw queries)
    python experiments/plot_quality.py runs/quality_*_8k/metrics.jsonl --out quality.png
"""

from __future__ import annotations

import dataclasses

from experiments.configs.modes import MODES
from scfa_jax.model import preset
from scfa_jax.train import TrainConfig

_BASE = TrainConfig(
    data="python",
    model=preset("gpt122m", vocab_size=257, block_size=8192, positions="rope"),
    batch_size=4,
    steps=2000,
    lr=6e-4,
    warmup_frac=0.05,
    min_lr_frac=0.1,
    eval_every=250,
    eval_batches=4,
    log_every=10,
    checkpoint_every=0,
    sample_tokens=0,
    seed=0,
    segment_documents=False,  # one stream per window: dense attention has no fast document mask
)

CONFIGS = {
    f"quality_{mode}_8k": dataclasses.replace(
        _BASE, model=dataclasses.replace(_BASE.model, **fields), out_dir=f"runs/quality_{mode}_8k"
    )
    for mode, fields in MODES.items()
    if mode in ("dense", "hash8", "hash16", "hash32", "hash16_plain", "drop30")
}
