"""Triton source of the SCFA kernels: `@triton.jit` functions only, no JAX.

Installed as `scfa_jax.kernels` (pyproject.toml maps this folder there), never as a
top-level `kernels`: PyPI has an unrelated distribution of that name.
"""
