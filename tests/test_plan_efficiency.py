"""experiments/plan_efficiency.py's count of allowed pairs against a brute-force count."""

import jax
import numpy as np
import pytest

from experiments.plan_efficiency import allowed_pairs, kernel_rows
from scfa_jax import sorting


@pytest.mark.parametrize("hashed", [True, False])
def test_allowed_pairs_matches_brute_force(hashed):
  b, t, n = 2, 77, 3
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  if hashed:
    q_masks, k_masks = (np.asarray(jax.random.randint(k, (b, t, n), 0, 5)) for k in (k1, k2))
    tokens = sorting.by_bucket(q_masks, k_masks)
    same = lambda bb, nn: q_masks[bb, :, nn][:, None] == k_masks[bb, :, nn][None, :]
  else:
    q_masks, k_masks = (np.asarray(jax.random.bernoulli(k, 0.6, (b, t, n))) for k in (k1, k2))
    tokens = sorting.by_keep_mask(q_masks, k_masks)
    same = lambda bb, nn: q_masks[bb, :, nn][:, None] & k_masks[bb, :, nn][None, :]
  causal = np.tril(np.ones((t, t), bool))
  expected = sum(int((same(bb, nn) & causal).sum()) for bb in range(b) for nn in range(n))
  assert allowed_pairs(tokens) == expected


def test_all_kept_plans_visit_the_causal_tiles():
  t = 256
  keep = np.ones((1, t, 1), bool)
  rows = {r["kernel"]: r for r in kernel_rows("all", sorting.by_keep_mask(keep, keep), head_dim=64)}
  # The forward's 128x64 tiles: 2 query tiles visiting 2 and 4 key tiles, the diagonal ones masked.
  assert rows["fwd"]["tiles_per_head"] == 6
  assert rows["fwd"]["pair_efficiency"] == pytest.approx(t * (t + 1) / 2 / (6 * 128 * 64))
  assert all(0.0 < r["masked_share"] < 1.0 for r in rows.values())
