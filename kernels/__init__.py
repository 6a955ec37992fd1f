"""Triton source of the SCFA kernels: `@triton.jit` functions only, no JAX.

Imported as `scfa_jax.kernels` (scfa_jax/kernels links here), never as a top-level
`kernels`: PyPI has an unrelated distribution of that name.
"""
