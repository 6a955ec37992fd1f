"""Attention modes by name, as `GPTConfig` fields: the names of runs and benchmark rows."""

MODES = {
    "dense": {"attention": "dense"},
    "hash8": {"attention": "hash", "num_buckets": 8},
    "hash16": {"attention": "hash", "num_buckets": 16},
    "hash32": {"attention": "hash", "num_buckets": 32},
    "hash16_plain": {"attention": "hash", "num_buckets": 16, "center_hash": False},  # the paper's LSH
    "drop30": {"attention": "qk_drop", "drop_rate": 0.3},
    "drop50": {"attention": "qk_drop", "drop_rate": 0.5},
    "drop70": {"attention": "qk_drop", "drop_rate": 0.7},
}
