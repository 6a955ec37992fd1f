"""scfa-jax: Sparse Causal Flash Attention (Pagliardini et al., NeurIPS 2023) for JAX."""

from scfa_jax.api import hash_sparse_attention, qk_sparse_attention, sparse_causal_attention
from scfa_jax.lsh import causal_center, centered_buckets, lsh_buckets, random_rotations
from scfa_jax.model import GPT, GPTConfig
from scfa_jax.nn import SparseCausalSelfAttention, attention_fn

__all__ = [
    "GPT",
    "GPTConfig",
    "SparseCausalSelfAttention",
    "attention_fn",
    "causal_center",
    "centered_buckets",
    "hash_sparse_attention",
    "lsh_buckets",
    "qk_sparse_attention",
    "random_rotations",
    "sparse_causal_attention",
]
__version__ = "0.1.0"
