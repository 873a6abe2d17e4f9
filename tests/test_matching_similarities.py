"""Each similarity of `vlp.matching` against a per-pair numpy loop written from
its formula, plus the properties every masked similarity must have: padded
fragments (with garbage in them) change nothing, the order of the regions changes
nothing, and an image or caption with no real fragment gives finite scores and
finite gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp.matching import similarities as S

DIM = 6
RTOL, ATOL = 2e-4, 2e-5


def make_inputs(seed=0, num_images=3, num_regions=5, num_texts=4, num_tokens=6):
  rng = np.random.default_rng(seed)
  regions = rng.normal(size=(num_images, num_regions, DIM)).astype(np.float32)
  tokens = rng.normal(size=(num_texts, num_tokens, DIM)).astype(np.float32)
  region_mask = rng.random((num_images, num_regions)) < 0.7
  token_mask = rng.random((num_texts, num_tokens)) < 0.7
  region_mask[:, 0] = True  # Every item has a real fragment here (empty ones: below).
  token_mask[:, 0] = True
  region_mask[0] = True  # One image with no padding at all.
  return regions, region_mask, tokens, token_mask


# ---- numpy references: one (image, caption) pair at a time, real fragments only ----

def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cos(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def pool_np(values, how, lam=1.0):
  if how == "mean":
    return values.mean()
  if how == "sum":
    return values.sum()
  if how == "max":
    return values.max()
  return np.log(np.exp(lam * values).sum()) / lam


def ref_cosine_global(v, w):
  return cos(v.mean(0), w.mean(0))


def ref_max_sum(v, w, normalize=True, reduce="sum"):
  if normalize:
    v, w = unit(v), unit(w)
  best = np.array([max(v[r] @ w[l] for r in range(len(v))) for l in range(len(w))])
  return best.sum() if reduce == "sum" else best.mean()


def leaky(x, slope):
  return np.where(x > 0, x, slope * x)


def ref_scan_t2i(v, w, lambda_softmax=9.0, agg="mean", lambda_lse=6.0, clip="leaky_relu"):
  v, w = unit(v), unit(w)
  s = v @ w.T  # [R, L]
  s = leaky(s, 0.1) if clip == "leaky_relu" else np.maximum(s, 0)
  s = s / (np.sqrt((s ** 2).sum(axis=1, keepdims=True)) + 1e-8)  # over the words
  rel = []
  for l in range(len(w)):
    alpha = softmax(lambda_softmax * s[:, l], 0)
    rel.append(cos(w[l], alpha @ v))
  return pool_np(np.array(rel), agg, lambda_lse)


def ref_scan_i2t(v, w, lambda_softmax=4.0, agg="mean", lambda_lse=5.0, clip="leaky_relu"):
  v, w = unit(v), unit(w)
  s = v @ w.T
  s = leaky(s, 0.1) if clip == "leaky_relu" else np.maximum(s, 0)
  s = s / (np.sqrt((s ** 2).sum(axis=0, keepdims=True)) + 1e-8)  # over the regions
  rel = []
  for r in range(len(v)):
    alpha = softmax(lambda_softmax * s[r, :], 0)
    rel.append(cos(v[r], alpha @ w))
  return pool_np(np.array(rel), agg, lambda_lse)


def ref_ensemble(v, w):
  return 0.5 * (ref_scan_t2i(v, w) + ref_scan_i2t(v, w, agg="lse", lambda_lse=20.0))


def ref_token_flow(v, w, tau=0.05):
  v, w = unit(v), unit(w)
  g_v, g_w = unit(v.mean(0)), unit(w.mean(0))
  w_r = softmax(v @ g_w / tau, 0)
  w_l = softmax(w @ g_v / tau, 0)
  return sum(w_r[r] * w_l[l] * (v[r] @ w[l]) for r in range(len(v)) for l in range(len(w)))


def ref_aligned_local(v, w, tau=10.0, direction="both"):
  local = v @ w.T / tau
  word = np.mean([softmax(local[:, l], 0) @ local[:, l] for l in range(len(w))])
  region = np.mean([softmax(local[r, :], 0) @ local[r, :] for r in range(len(v))])
  return {"word": word, "region": region, "both": 0.5 * (word + region)}[direction]


def ref_damsm_word(v, w, gamma1=4.0, gamma2=5.0, paper_scaling=False):
  e = v @ w.T  # [R, L]
  p = softmax(e, 1)  # each region over the words
  rel = []
  for l in range(len(w)):
    alpha = softmax(gamma1 * p[:, l], 0)  # each word over the regions
    rel.append(cos(alpha @ v, w[l]))
  out = np.log(np.exp(gamma2 * np.array(rel)).sum())
  return out / gamma2 if paper_scaling else out


def np_score(q, k, score, params, activation="tanh"):
  """score(word q, region k) written out for one pair of vectors."""
  if score == "dot":
    return q @ k
  if score == "scaled_dot":
    return q @ k / np.sqrt(len(q))
  if score == "cosine":
    return cos(q, k)
  p = {n: np.asarray(x, np.float64) for n, x in params.items()}
  if score == "general":
    return q @ p["w"] @ k
  if score == "additive":
    return p["u"] @ np.tanh(k @ p["w_key"] + q @ p["w_query"])
  x = q @ (p["w"] @ k + p["b"])
  if score == "biased":
    return x
  return {"tanh": np.tanh(x), "relu": max(x, 0.0),
          "leaky_relu": x if x > 0 else 0.01 * x}[activation]


def ref_cross_attention(v, w, score="cosine", activation="tanh", params=None,
                        lambda_softmax=9.0, agg="mean", lambda_lse=6.0):
  rel = []
  for l in range(len(w)):
    e = np.array([np_score(w[l], v[r], score, params, activation) for r in range(len(v))])
    alpha = softmax(lambda_softmax * e, 0)
    rel.append(cos(w[l], alpha @ v))
  return pool_np(np.array(rel), agg, lambda_lse)


def ref_hgan_3level(v, w, weights=(1 / 3, 1 / 3, 1 / 3), lambda_softmax=9.0):
  rel = []
  for word in w:
    alpha = softmax(lambda_softmax * np.array([cos(word, r) for r in v]), 0)
    rel.append(cos(word, alpha @ v))
  levels = (np.mean(rel), cos(v.max(0), w.max(0)), cos(v.mean(0), w.mean(0)))
  return float(np.dot(weights, levels))


def reference_matrix(ref, regions, region_mask, tokens, token_mask, **hyper):
  regions, tokens = regions.astype(np.float64), tokens.astype(np.float64)
  out = np.zeros((len(regions), len(tokens)))
  for i in range(len(regions)):
    for t in range(len(tokens)):
      out[i, t] = ref(regions[i][region_mask[i]], tokens[t][token_mask[t]], **hyper)
  return out


ENSEMBLE = (("scan_t2i", {}), ("scan_i2t", {"agg": "lse", "lambda_lse": 20.0}))
CASES = [
    ("cosine_global", {}, ref_cosine_global),
    ("max_sum", {}, ref_max_sum),
    ("max_sum", {"normalize": False, "reduce": "mean"}, ref_max_sum),
    ("scan_t2i", {}, ref_scan_t2i),
    ("scan_t2i", {"agg": "lse", "clip": "relu"}, ref_scan_t2i),
    ("scan_t2i", {"agg": "max", "lambda_softmax": 2.0}, ref_scan_t2i),
    ("scan_i2t", {}, ref_scan_i2t),
    ("scan_i2t", {"agg": "sum"}, ref_scan_i2t),
    ("scan_i2t", {"agg": "lse", "lambda_lse": 20.0}, ref_scan_i2t),
    ("ensemble", {"members": ENSEMBLE}, ref_ensemble),
    ("token_flow", {}, ref_token_flow),
    ("token_flow", {"tau": 1.0}, ref_token_flow),
    ("aligned_local", {}, ref_aligned_local),
    ("aligned_local", {"direction": "word", "tau": 1.0}, ref_aligned_local),
    ("aligned_local", {"direction": "region"}, ref_aligned_local),
    ("damsm_word", {}, ref_damsm_word),
    ("damsm_word", {"paper_scaling": True, "gamma1": 2.0}, ref_damsm_word),
    ("hgan_3level", {}, ref_hgan_3level),
    ("hgan_3level", {"weights": (0.5, 0.2, 0.3), "lambda_softmax": 2.0}, ref_hgan_3level),
] + [("cross_attention", {"score": s, "lambda_softmax": 3.0}, ref_cross_attention)
     for s in ("dot", "scaled_dot", "cosine", "general", "biased", "additive")] + [
    ("cross_attention", {"score": "activated", "activation": a, "agg": "lse"},
     ref_cross_attention) for a in ("tanh", "relu", "leaky_relu")]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in h.items() if k != 'members')}"
       for n, h, _ in CASES]


def case_params(name, hyper):
  if not S.needs_params(name, **hyper):
    return None
  params = S.init_params(name, DIM, jax.random.key(1), **hyper)
  if "b" in params:  # A non-zero bias, so that biased differs from general.
    params["b"] = jax.random.normal(jax.random.key(2), (DIM,))
  return params


def call(sim, params, *arrays):
  return sim(*arrays) if params is None else sim(*arrays, params=params)


@pytest.mark.parametrize("name,hyper,ref", CASES, ids=IDS)
def test_similarity_matches_reference_and_ignores_padding_and_region_order(name, hyper, ref):
  regions, region_mask, tokens, token_mask = make_inputs()
  params = case_params(name, hyper)
  sim = jax.jit(S.get_similarity(name, **hyper))
  got = np.asarray(call(sim, params, regions, region_mask, tokens, token_mask))
  assert got.dtype == np.float32 and got.shape == (3, 4)
  ref_hyper = dict(hyper)
  ref_hyper.pop("members", None)
  if params is not None:
    ref_hyper["params"] = jax.device_get(params)
  want = reference_matrix(ref, regions, region_mask, tokens, token_mask, **ref_hyper)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg="vs numpy loop")

  # Same shapes: shuffle the regions (and their mask) of every image.
  perm = np.random.default_rng(3).permutation(regions.shape[1])
  shuffled = np.asarray(call(sim, params, regions[:, perm], region_mask[:, perm], tokens,
                             token_mask))
  np.testing.assert_allclose(shuffled, got, rtol=1e-5, atol=1e-6, err_msg="region order")

  # Extra padded regions and tokens full of garbage (huge values, inf, NaN).
  def pad(x, mask, extra, seed):
    junk = 1e4 * np.random.default_rng(seed).normal(size=x.shape[:1] + (extra, DIM))
    junk[:, 0, 0], junk[:, -1, -1] = np.inf, np.nan
    return (np.concatenate([x, junk.astype(np.float32)], 1),
            np.concatenate([mask, np.zeros(mask.shape[:1] + (extra,), bool)], 1))
  padded = np.asarray(call(S.get_similarity(name, **hyper), params,
                           *pad(regions, region_mask, 3, 4), *pad(tokens, token_mask, 2, 5)))
  np.testing.assert_allclose(padded, got, rtol=1e-5, atol=1e-6, err_msg="padding")


@pytest.mark.parametrize("name,hyper,ref", CASES, ids=IDS)
def test_empty_items_give_finite_scores_and_gradients(name, hyper, ref):
  regions, region_mask, tokens, token_mask = make_inputs(seed=1)
  region_mask[1] = False  # An image with no real region.
  token_mask[2] = False  # A caption with no real token.
  params = case_params(name, hyper)
  sim = S.get_similarity(name, **hyper)

  def total(regions, tokens, params):
    return jnp.sum(call(sim, params, regions, region_mask, tokens, token_mask))

  scores = call(sim, params, regions, region_mask, tokens, token_mask)
  assert np.all(np.isfinite(scores))
  np.testing.assert_allclose(scores[1], 0.0, atol=1e-6)
  np.testing.assert_allclose(scores[:, 2], 0.0, atol=1e-6)
  grads = jax.grad(total, argnums=(0, 1, 2))(regions, tokens, params)
  for leaf in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(leaf))
  # No gradient reaches padded fragments.
  assert np.all(np.asarray(grads[0])[~region_mask] == 0)
  assert np.all(np.asarray(grads[1])[~token_mask] == 0)


def test_scan_lse_pooling_limits():
  """LSE pooling tends to the max as lambda_lse grows and to mean + log(n)/lambda
  as it shrinks (n = real words of the caption)."""
  arrays = make_inputs(seed=2)
  t2i = functools.partial(S.get_similarity, "scan_t2i")
  maximum = np.asarray(t2i(agg="max")(*arrays))
  mean = np.asarray(t2i(agg="mean")(*arrays))
  sharp = np.asarray(t2i(agg="lse", lambda_lse=1e4)(*arrays))
  np.testing.assert_allclose(sharp, maximum, atol=2e-4)
  lam = 1e-3
  flat = np.asarray(t2i(agg="lse", lambda_lse=lam)(*arrays))
  words = arrays[3].sum(1)[None, :]
  np.testing.assert_allclose(flat, mean + np.log(words) / lam, atol=2e-2, rtol=1e-5)
  assert not np.allclose(mean, maximum, atol=1e-2)  # The limits are distinct.


def test_cosine_global_is_decomposable_and_the_others_are_not():
  regions, region_mask, tokens, token_mask = make_inputs()
  scores = S.get_similarity("cosine_global")(regions, region_mask, tokens, token_mask)
  emb = S.global_embedding(regions, region_mask) @ S.global_embedding(tokens, token_mask).T
  np.testing.assert_allclose(scores, emb, rtol=1e-6)
  assert S.is_decomposable("cosine_global")
  assert not any(S.is_decomposable(n) for n in S.SIMILARITIES if n != "cosine_global")


def test_bad_names_and_missing_params_are_clear_errors():
  with pytest.raises(ValueError, match="unknown similarity 'scan'.*scan_t2i"):
    S.get_similarity("scan")
  with pytest.raises(ValueError, match="no hyper-parameter.*lambda1.*lambda_softmax"):
    S.get_similarity("scan_t2i", lambda1=9.0)
  with pytest.raises(ValueError, match="pooling 'avg'"):
    S.get_similarity("scan_i2t", agg="avg")(*make_inputs())
  with pytest.raises(ValueError, match="'general' needs params.*init_params"):
    S.get_similarity("cross_attention", score="general")(*make_inputs())


# ---- chunked, sharded all-pairs scoring ----

def traced_once(sim):
  """sim, counting how often jit traces it (once per block shape)."""
  def counted(*args, **kwargs):
    counted.traces += 1
    return sim(*args, **kwargs)
  counted.traces = 0
  return counted


@pytest.mark.parametrize("name,hyper", [
    ("scan_t2i", {"agg": "lse"}),
    ("cross_attention", {"score": "biased"}),
])
def test_score_matrix_tiles_and_shards_to_the_same_scores(name, hyper):
  from vlp.matching.score_matrix import score_matrix
  from vlp.parallel.mesh import make_mesh
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  # 13 images x 11 texts: neither divides its block size, so last blocks are padded.
  regions, region_mask, tokens, token_mask = make_inputs(
      seed=6, num_images=13, num_regions=4, num_texts=11, num_tokens=5)
  params = case_params(name, hyper)
  sim = S.get_similarity(name, **hyper)
  whole = np.asarray(call(sim, params, regions, region_mask, tokens, token_mask))

  counted = traced_once(sim)
  tiled = score_matrix(counted, regions, region_mask, tokens, token_mask,
                       chunk_images=4, chunk_texts=3, params=params)
  assert counted.traces == 1  # 4 x 4 blocks, one compilation
  np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-6)

  for mesh_cfg in ({"data": -1}, {"data": 4, "fsdp": 2}):
    mesh = make_mesh(mesh_cfg)
    sharded = score_matrix(sim, regions, region_mask, tokens, token_mask,
                           chunk_images=8, chunk_texts=4, mesh=mesh, params=params)
    assert sharded.shape == (13, 11) and sharded.dtype == np.float32
    np.testing.assert_allclose(sharded, tiled, rtol=1e-5, atol=1e-6, err_msg=str(mesh_cfg))

  with pytest.raises(ValueError, match="chunk_images=4 must be a multiple of the 8 image"):
    score_matrix(sim, regions, region_mask, tokens, token_mask, chunk_images=4,
                 chunk_texts=4, mesh=make_mesh({"data": -1}), params=params)
  with pytest.raises(ValueError, match="regions are 6-d but tokens 5-d"):
    score_matrix(sim, regions, region_mask, tokens[..., :5], token_mask,
                 chunk_images=4, chunk_texts=4)
