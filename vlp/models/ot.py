"""Word-region alignment distance by optimal transport (UNITER WRA, reference
`model/ot.py`; docs/reference.md, "WRA").

The cost between text token i and region j is the cosine distance of their
final hidden states. The transport plan comes from IPOT (inexact proximal point
OT) with a fixed number of iterations and is treated as a constant, so the
distance ``sum_ij C_ij T_ji`` sends gradients only through the cost.

All arrays carry a leading batch axis; masks are True on real tokens. Everything
is computed in float32 whatever the input dtype. The public functions are
jitted (hyper-parameters static) so that eager callers compile the loop once.
"""

import functools

import jax
import jax.numpy as jnp

# Added to the delta/sigma denominators on padding so those entries stay tiny
# (value fixed by the reference implementation).
_PAD_PENALTY = 1e4


def cosine_cost(txt: jax.Array, img: jax.Array, txt_mask: jax.Array,
                img_mask: jax.Array, *, eps: float = 1e-5) -> jax.Array:
  """Cosine distance between every text token and every region.

  Args:
    txt: [B, M, H] text hidden states.
    img: [B, N, H] region hidden states.
    txt_mask: [B, M] bool, True on real text tokens.
    img_mask: [B, N] bool, True on real regions.
    eps: lower bound on the L2 norm used for normalisation.

  Returns:
    [B, M, N] float32 cost ``1 - cos``; 0 wherever either side is padding.
  """
  txt = txt.astype(jnp.float32)
  img = img.astype(jnp.float32)
  txt_mask, img_mask = txt_mask.astype(bool), img_mask.astype(bool)
  txt = txt / jnp.maximum(jnp.linalg.norm(txt, axis=-1, keepdims=True), eps)
  img = img / jnp.maximum(jnp.linalg.norm(img, axis=-1, keepdims=True), eps)
  cost = 1.0 - jnp.einsum("bmh,bnh->bmn", txt, img,
                          precision=jax.lax.Precision.HIGHEST)
  joint = txt_mask[:, :, None] & img_mask[:, None, :]
  return jnp.where(joint, cost, 0.0)


@functools.partial(jax.jit, static_argnames=("beta", "iterations", "k"))
def ipot_plan(cost: jax.Array, txt_mask: jax.Array, img_mask: jax.Array, *,
              beta: float = 0.5, iterations: int = 50, k: int = 1) -> jax.Array:
  """IPOT transport plan with uniform marginals (1/n_t text, 1/n_v regions).

  Args:
    cost: [B, M, N] cost matrix (text x regions), 0 at padding.
    txt_mask: [B, M] bool, True on real text tokens.
    img_mask: [B, N] bool, True on real regions.
    beta: proximal step size.
    iterations: number of outer proximal iterations.
    k: number of inner Sinkhorn-style iterations per outer one.

  Returns:
    [B, N, M] float32 plan (regions x text), 0 at padding; its text marginals
    are exactly 1/n_t and its region marginals approximately 1/n_v.
  """
  if k < 1:
    raise ValueError(f"IPOT needs k >= 1 inner iterations, got {k}")
  cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
  txt_mask, img_mask = txt_mask.astype(bool), img_mask.astype(bool)
  joint = img_mask[:, :, None] & txt_mask[:, None, :]  # [B, N, M]
  n_t = jnp.sum(txt_mask, axis=-1).astype(jnp.float32)[:, None]  # [B, 1]
  n_v = jnp.sum(img_mask, axis=-1).astype(jnp.float32)[:, None]
  # An example with no region (or no text) has no real pair; counting its real
  # tokens as padding keeps every denominator positive (no inf/nan) and gives a
  # zero plan. It changes nothing when both sides are non-empty.
  has_t = n_t > 0
  has_v = n_v > 0
  pad_t = _PAD_PENALTY * (~txt_mask | ~has_v).astype(jnp.float32)  # [B, M]
  pad_v = _PAD_PENALTY * (~img_mask | ~has_t).astype(jnp.float32)  # [B, N]

  a = jnp.where(joint, jnp.exp(-jnp.swapaxes(cost, 1, 2) / beta), 0.0)
  plan = joint.astype(jnp.float32)
  sigma = jnp.where(txt_mask, 1.0 / jnp.maximum(n_t, 1.0), 0.0)  # [B, M]
  hi = jax.lax.Precision.HIGHEST

  def outer(_, carry):
    plan, sigma = carry
    q = a * plan

    def inner(_, carry):
      _, sigma = carry
      delta = 1.0 / (n_v * jnp.einsum("bnm,bm->bn", q, sigma, precision=hi) +
                     pad_v)
      sigma = 1.0 / (n_t * jnp.einsum("bnm,bn->bm", q, delta, precision=hi) +
                     pad_t)
      return delta, sigma

    delta0 = jnp.zeros(q.shape[:2], jnp.float32)
    delta, sigma = jax.lax.fori_loop(0, k, inner, (delta0, sigma))
    plan = delta[:, :, None] * q * sigma[:, None, :]
    return plan, sigma

  plan, _ = jax.lax.fori_loop(0, iterations, outer, (plan, sigma))
  return jnp.where(joint, plan, 0.0)


@functools.partial(jax.jit, static_argnames=("beta", "iterations", "k"))
def optimal_transport_distance(txt: jax.Array, img: jax.Array,
                               txt_mask: jax.Array, img_mask: jax.Array, *,
                               beta: float = 0.5, iterations: int = 50,
                               k: int = 1) -> jax.Array:
  """WRA distance per example: ``sum_ij C_ij T_ji`` with the IPOT plan fixed.

  Args:
    txt: [B, M, H] text hidden states (all real text positions, [CLS] and
      [SEP] included).
    img: [B, N, H] region hidden states.
    txt_mask: [B, M] bool, True on real text tokens.
    img_mask: [B, N] bool, True on real regions.
    beta: IPOT proximal step size.
    iterations: IPOT outer iterations.
    k: IPOT inner iterations.

  Returns:
    [B] float32 distances; gradients flow only through the cost.
  """
  cost = cosine_cost(txt, img, txt_mask, img_mask)
  plan = jax.lax.stop_gradient(
      ipot_plan(cost, txt_mask, img_mask, beta=beta, iterations=iterations,
                k=k))
  return jnp.sum(cost * jnp.swapaxes(plan, 1, 2), axis=(1, 2))
