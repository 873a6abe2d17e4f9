"""Tests for vlp.models.ot (WRA optimal-transport distance, UNITER `model/ot.py`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linprog

from vlp.models import ot

# The OT functions are jitted by the library; the cost alone is jitted here so
# the module compiles only a handful of times.
_dist = ot.optimal_transport_distance
_plan = ot.ipot_plan
_cost = jax.jit(ot.cosine_cost)

# Real (n_t, n_v) per example, all padded to T = K = 9: n_t < n_v, n_t > n_v,
# n_t == n_v, unpadded on one or both sides, an example without regions, and
# (last) one whose regions are noisy copies of its words in another order.
_SIZES = [(7, 7), (4, 6), (7, 4), (2, 3), (9, 9), (5, 2), (3, 9), (9, 8),
          (4, 0), (5, 5)]
_PERMUTED = len(_SIZES) - 1
_T = _K = 9
_H = 16

# IPOT (beta=0.5, 50 outer iterations, k=1) is a proximal-point method: its
# plan converges to an exact OT plan but is not exact after 50 steps, and only
# its text marginals are exact. Measured on 40 random cases like these (n_t, n_v
# in 2..9, Gaussian states): relative gap of the distance to the LP optimum
# <= 2.9e-3 (median ~3e-4, IPOT always above), region marginals within 0.7% of
# 1/n_v. The bounds leave ~3x margin; a transposed plan or a wrong marginal
# misses them.
_DIST_RTOL = 1e-2
_REGION_MARGINAL_RTOL = 2e-2


@functools.lru_cache(maxsize=None)
def _batch(seed=0):
  rng = np.random.default_rng(seed)
  b = len(_SIZES)
  # Padding slots hold large garbage: they must not matter.
  txt = 100 * rng.normal(size=(b, _T, _H)).astype(np.float32)
  img = 100 * rng.normal(size=(b, _K, _H)).astype(np.float32)
  txt_mask = np.zeros((b, _T), bool)
  img_mask = np.zeros((b, _K), bool)
  for i, (n_t, n_v) in enumerate(_SIZES):
    txt[i, :n_t] = rng.normal(size=(n_t, _H))
    img[i, :n_v] = rng.normal(size=(n_v, _H))
    txt_mask[i, :n_t] = True
    img_mask[i, :n_v] = True
  # A near-zero state: its norm is below the normalisation eps (1e-5).
  txt[0, 0] *= 1e-6
  img[_PERMUTED, :5] = (txt[_PERMUTED, rng.permutation(5)] +
                        0.3 * rng.normal(size=(5, _H)))
  return txt, img, txt_mask, img_mask


def _exact_ot(cost):
  """Exact OT with uniform marginals by linear programming (HiGHS)."""
  m, n = cost.shape
  rows = np.kron(np.eye(m), np.ones((1, n)))  # sum_j P_ij = 1/m
  cols = np.kron(np.ones((1, m)), np.eye(n))  # sum_i P_ij = 1/n
  res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]),
                b_eq=np.concatenate([np.full(m, 1 / m), np.full(n, 1 / n)]),
                bounds=(0, None), method="highs")
  assert res.status == 0
  return res.fun


def test_matches_exact_lp_and_marginals():
  txt, img, txt_mask, img_mask = _batch()
  dist = np.asarray(_dist(txt, img, txt_mask, img_mask))
  cost = _cost(txt, img, txt_mask, img_mask)
  plan = np.asarray(_plan(cost, txt_mask, img_mask))
  cost = np.asarray(cost, np.float64)
  assert dist.shape == (len(_SIZES),) and dist.dtype == np.float32
  assert plan.shape == (len(_SIZES), _K, _T)
  for i, (n_t, n_v) in enumerate(_SIZES):
    assert np.all(cost[i, n_t:] == 0) and np.all(cost[i, :, n_v:] == 0)
    assert np.all(plan[i, n_v:] == 0) and np.all(plan[i, :, n_t:] == 0)
    if n_v == 0:  # nothing to align: zero, not nan
      assert dist[i] == 0
      continue
    exact = _exact_ot(cost[i, :n_t, :n_v])
    np.testing.assert_allclose(dist[i], exact, rtol=_DIST_RTOL, err_msg=str(i))
    np.testing.assert_allclose(plan[i].sum(0)[:n_t], 1 / n_t, rtol=1e-5)
    np.testing.assert_allclose(plan[i].sum(1)[:n_v], 1 / n_v,
                               rtol=_REGION_MARGINAL_RTOL)


def test_converges_on_near_permutation():
  # With a clear best matching IPOT finds it almost exactly (measured relative
  # gap ~1e-7 on such cases).
  txt, img, txt_mask, img_mask = _batch()
  dist = _dist(txt, img, txt_mask, img_mask)[_PERMUTED]
  cost = np.asarray(_cost(txt, img, txt_mask, img_mask), np.float64)
  np.testing.assert_allclose(dist, _exact_ot(cost[_PERMUTED, :5, :5]),
                             rtol=1e-4)


def test_padding_invariance():
  txt, img, txt_mask, img_mask = _batch()
  padded = _dist(txt, img, txt_mask, img_mask)
  i = 1
  n_t, n_v = _SIZES[i]
  alone = _dist(txt[i:i + 1, :n_t], img[i:i + 1, :n_v],
                np.ones((1, n_t), bool), np.ones((1, n_v), bool))
  np.testing.assert_allclose(padded[i], alone[0], rtol=1e-6, atol=1e-6)


def _np_cost(txt, img, txt_mask, img_mask):
  """float64 cosine cost [M, N] of one example, 0 touching padding."""
  x = txt / np.maximum(np.linalg.norm(txt, axis=-1, keepdims=True), 1e-5)
  y = img / np.maximum(np.linalg.norm(img, axis=-1, keepdims=True), 1e-5)
  return np.where(txt_mask[:, None] & img_mask[None], 1 - x @ y.T, 0.0)


def test_gradient_only_through_cost():
  txt, img, txt_mask, img_mask = _batch()
  grad = jax.jit(jax.grad(lambda x: jnp.sum(
      ot.optimal_transport_distance(x, img, txt_mask, img_mask))))(txt)
  assert np.all(np.isfinite(grad))
  plan = np.asarray(_plan(_cost(txt, img, txt_mask, img_mask), txt_mask,
                          img_mask), np.float64)
  i = 1
  n_t = _SIZES[i][0]

  def fixed_plan_dist(x):  # plan held constant: only the cost moves
    return np.sum(_np_cost(x, img[i].astype(np.float64), txt_mask[i],
                           img_mask[i]) * plan[i].T)

  x0 = txt[i].astype(np.float64)
  fd = np.zeros_like(x0)
  eps = 1e-6
  for idx in np.ndindex(n_t, _H):
    step = np.zeros_like(x0)
    step[idx] = eps
    fd[idx] = (fixed_plan_dist(x0 + step) -
               fixed_plan_dist(x0 - step)) / (2 * eps)
  np.testing.assert_allclose(grad[i], fd, rtol=1e-3, atol=1e-6)
  assert np.all(grad[i, n_t:] == 0)  # padded text rows get no gradient
  assert np.all(grad[_SIZES.index((4, 0))] == 0)  # nor an image-less example


def _np_ipot_distance(txt, img, txt_mask, img_mask, beta=0.5, iterations=50,
                      k=1):
  """The reference IPOT loop (`model/ot.py`) for one example, float64 numpy."""
  cost = _np_cost(txt, img, txt_mask, img_mask)
  n_t, n_v = txt_mask.sum(), img_mask.sum()
  joint = img_mask[:, None] & txt_mask[None]  # [N, M]
  a = np.where(joint, np.exp(-cost.T / beta), 0.0)
  plan = joint.astype(np.float64)
  sigma = np.where(txt_mask, 1.0 / n_t, 0.0)
  pad_t, pad_v = 1e4 * ~txt_mask, 1e4 * ~img_mask
  for _ in range(iterations):
    q = a * plan
    for _ in range(k):
      delta = 1 / (n_v * (q @ sigma) + pad_v)
      sigma = 1 / (n_t * (q.T @ delta) + pad_t)
    plan = delta[:, None] * q * sigma[None]
  plan = np.where(joint, plan, 0.0)
  return np.trace(cost @ plan)


def test_matches_numpy_reference_ipot():
  txt, img, txt_mask, img_mask = _batch()
  for k in (1, 2):
    got = np.asarray(_dist(txt, img, txt_mask, img_mask, k=k))
    for i, (_, n_v) in enumerate(_SIZES):
      if n_v == 0:  # the pseudo-code divides by zero there
        continue
      want = _np_ipot_distance(txt[i].astype(np.float64),
                               img[i].astype(np.float64), txt_mask[i],
                               img_mask[i], k=k)
      np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-6,
                                 err_msg=f"example {i}, k={k}")


def test_bfloat16_inputs_computed_in_float32():
  txt, img, txt_mask, img_mask = _batch()
  out = _dist(jnp.asarray(txt, jnp.bfloat16), jnp.asarray(img, jnp.bfloat16),
              txt_mask, img_mask)
  assert out.dtype == jnp.float32
  ref = _dist(txt, img, txt_mask, img_mask)
  np.testing.assert_allclose(out, ref, rtol=2e-2, atol=1e-6)
