"""Matching losses of `vlp.matching` against hand computations and per-anchor
numpy loops; the unified loss's two limits; masks (same-image captions, padding)
and finite gradients; the momentum queue; the hardest-negative sampler."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp.matching import hard_negatives, losses as L, momentum_queue as Q


def batch(seed=0):
  """4 images (the last one padding), 7 captions (the last one padding); image 0
  has three captions, image 1 two, image 2 one; caption 5 shows an image that is
  not in the batch (a text with no positive)."""
  rng = np.random.default_rng(seed)
  scores = rng.uniform(-1, 1, size=(4, 7))
  caption_image = np.array([0, 0, 0, 1, 1, 7, 2])
  positives = np.arange(4)[:, None] == caption_image[None, :]
  image_mask = np.array([True, True, True, False])
  text_mask = np.array([True] * 6 + [False])
  return scores, positives, image_mask, text_mask


def ref_anchor_terms(scores, positives, image_mask, text_mask, term):
  """[(i2t terms), (t2i terms)], one per real positive pair; term(s_p, negatives)."""
  i2t, t2i = [], []
  for i in range(scores.shape[0]):
    for t in range(scores.shape[1]):
      if not (positives[i, t] and image_mask[i] and text_mask[t]):
        continue
      neg_t = [scores[i, u] for u in range(scores.shape[1])
               if text_mask[u] and not positives[i, u]]
      neg_i = [scores[j, t] for j in range(scores.shape[0])
               if image_mask[j] and not positives[j, t]]
      i2t.append(term(scores[i, t], np.array(neg_t)))
      t2i.append(term(scores[i, t], np.array(neg_i)))
  return i2t, t2i


def ref_hinge_sum(s, neg, margin):
  return sum(max(0.0, margin - s + n) for n in neg)


def ref_hinge_hardest(s, neg, margin):
  return max(0.0, margin - s + neg.max()) if len(neg) else 0.0


def ref_info_nce(s, neg, temperature):
  return -np.log(np.exp(s / temperature)
                 / (np.exp(s / temperature) + np.exp(neg / temperature).sum()))


def ref_unified(s, neg, gamma, margin):
  return np.log(1 + np.exp(gamma * (neg - s + margin)).sum()) / gamma


def ref_dcl(s, neg, temperature, beta):
  if not len(neg):
    return 0.0
  w = np.exp(beta * neg) / np.exp(beta * neg).sum()
  denominator = np.exp(s / temperature) + len(neg) * (w * np.exp(neg / temperature)).sum()
  return -np.log(np.exp(s / temperature) / denominator)


CASES = [
    ("hinge_sum", {"margin": 0.2}, ref_hinge_sum),
    ("hinge_sum", {"margin": 1.0, "reduction": "sum"}, ref_hinge_sum),
    ("hinge_hardest", {"margin": 0.2}, ref_hinge_hardest),
    ("hinge_hardest", {"margin": 0.5, "reduction": "sum"}, ref_hinge_hardest),
    ("info_nce", {"temperature": 0.1}, ref_info_nce),
    ("info_nce", {"temperature": 1.0, "reduction": "sum"}, ref_info_nce),
    ("unified", {"gamma": 3.0, "margin": 0.2}, ref_unified),
    ("dcl", {"temperature": 0.2, "beta": 4.0}, ref_dcl),
    ("dcl", {"temperature": 0.5, "beta": 0.0, "reduction": "sum"}, ref_dcl),
]


@pytest.mark.parametrize("name,hyper,ref", CASES,
                         ids=[f"{n}-{h}" for n, h, _ in CASES])
def test_loss_matches_per_anchor_loop(name, hyper, ref):
  scores, positives, image_mask, text_mask = batch()
  ref_hyper = {k: v for k, v in hyper.items() if k != "reduction"}
  i2t, t2i = ref_anchor_terms(scores, positives, image_mask, text_mask,
                              functools.partial(ref, **ref_hyper))
  reduce = np.sum if hyper.get("reduction") == "sum" else np.mean
  want = reduce(i2t) + reduce(t2i)
  got = L.get_loss(name, **hyper)(scores, positives, image_mask=image_mask,
                                  text_mask=text_mask)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_hinge_losses_by_hand():
  # Two images, three captions; caption 2 shows neither image.
  scores = np.array([[0.7, 0.6, 0.3],
                     [0.65, 0.8, 0.75]])
  positives = np.array([[True, False, False], [False, True, False]])
  # Anchor (0,0), s=0.7: captions 1 (0.6), 2 (0.3) -> 0.1, 0; image 1 (0.65) -> 0.15.
  # Anchor (1,1), s=0.8: captions 0 (0.65), 2 (0.75) -> 0.05, 0.15; image 0 (0.6) -> 0.
  np.testing.assert_allclose(L.hinge_sum(scores, positives, reduction="sum"),
                             0.1 + 0.15 + 0.05 + 0.15, rtol=1e-6)
  np.testing.assert_allclose(L.hinge_hardest(scores, positives, reduction="sum"),
                             0.1 + 0.15 + 0.15 + 0.0, rtol=1e-6)
  np.testing.assert_allclose(L.hinge_hardest(scores, positives),  # mean per direction
                             (0.1 + 0.15) / 2 + (0.15 + 0.0) / 2, rtol=1e-6)


def test_info_nce_by_hand_and_same_image_captions_are_not_negatives():
  scores = np.array([[2.0, 1.0, 0.0], [0.5, 1.5, 3.0]])
  # Image 0 has captions 0 and 1; image 1 has caption 2.
  positives = np.array([[True, True, False], [False, False, True]])
  e = np.exp
  i2t = [-np.log(e(2) / (e(2) + e(0))), -np.log(e(1) / (e(1) + e(0))),
         -np.log(e(3) / (e(3) + e(0.5) + e(1.5)))]
  t2i = [-np.log(e(2) / (e(2) + e(0.5))), -np.log(e(1) / (e(1) + e(1.5))),
         -np.log(e(3) / (e(3) + e(0)))]
  np.testing.assert_allclose(L.info_nce(scores, positives, temperature=1.0),
                             np.mean(i2t) + np.mean(t2i), rtol=1e-6)
  # Treating only the diagonal-like first caption as positive gives another value.
  diag = np.array([[True, False, False], [False, False, True]])
  assert abs(float(L.info_nce(scores, diag, temperature=1.0))
             - (np.mean(i2t) + np.mean(t2i))) > 0.1


def test_unified_loss_limits():
  scores, positives, image_mask, text_mask = batch(seed=1)
  kw = dict(image_mask=image_mask, text_mask=text_mask)
  for margin in (0.0, 0.2):
    hard = L.hinge_hardest(scores, positives, margin=margin, **kw)
    sharp = L.unified(scores, positives, gamma=1e4, margin=margin, **kw)
    np.testing.assert_allclose(sharp, hard, atol=1e-3)
  for tau in (0.05, 0.5):
    nce = L.info_nce(scores, positives, temperature=tau, **kw)
    soft = L.unified(scores, positives, gamma=1 / tau, margin=0.0, **kw)
    np.testing.assert_allclose(soft, tau * nce, rtol=1e-5)
  # At a moderate gamma the unified loss is strictly between the two.
  assert float(L.unified(scores, positives, gamma=5.0, margin=0.2, **kw)) > float(
      L.hinge_hardest(scores, positives, margin=0.2, **kw))


def test_dcl_with_uniform_weights_is_info_nce():
  scores, positives, image_mask, text_mask = batch(seed=2)
  kw = dict(image_mask=image_mask, text_mask=text_mask, temperature=0.3)
  np.testing.assert_allclose(L.dcl(scores, positives, beta=0.0, **kw),
                             L.info_nce(scores, positives, **kw), rtol=1e-6)
  assert float(L.dcl(scores, positives, beta=5.0, **kw)) > float(
      L.info_nce(scores, positives, **kw))  # harder negatives weigh more


def test_mil_nce_matches_comma_on_square_batches_and_a_loop_otherwise():
  rng = np.random.default_rng(3)
  s = rng.normal(size=(4, 4))
  # COMMA: mean_i [logsumexp(row_i and column_i, the diagonal in both) - s_ii].
  comma = np.mean([np.log(np.exp(np.concatenate([s[i], s[:, i]])).sum()) - s[i, i]
                   for i in range(4)])
  np.testing.assert_allclose(L.mil_nce(s, np.eye(4, dtype=bool)), comma, rtol=1e-6)

  scores, positives, image_mask, text_mask = batch(seed=4)
  tau = 0.5
  terms = []
  for i in range(4):
    pos = [t for t in range(7) if positives[i, t] and text_mask[t]]
    if not image_mask[i] or not pos:
      continue
    x = scores / tau
    numerator = np.log(sum(np.exp(x[i, t]) for t in pos))
    row = sum(np.exp(x[i, t]) for t in range(7) if text_mask[t])
    columns = sum(np.exp(x[j, t]) for t in pos for j in range(4) if image_mask[j])
    terms.append(np.log(row + columns) - numerator)
  got = L.mil_nce(scores, positives, image_mask=image_mask, text_mask=text_mask,
                  temperature=tau)
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-6)


ALL = [("hinge_sum", {}), ("hinge_hardest", {}), ("info_nce", {}), ("unified", {}),
       ("unified", {"gamma": 1e4}), ("damsm", {}), ("mil_nce", {}), ("dcl", {})]


@pytest.mark.parametrize("name,hyper", ALL, ids=[f"{n}-{h}" for n, h in ALL])
def test_gradients_are_finite_and_skip_padding(name, hyper):
  scores, positives, image_mask, text_mask = batch(seed=5)
  scores[3] = 1e6  # Garbage in the padded image's row.
  positives[1] = True  # Image 1 matches every caption: no negative for it.
  loss = L.get_loss(name, **hyper)
  grad = jax.grad(lambda s: loss(s, positives, image_mask=image_mask,
                                 text_mask=text_mask))(jnp.asarray(scores, jnp.float32))
  assert np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[3] == 0) and np.all(np.asarray(grad)[:, 6] == 0)
  # Nothing real at all: loss 0, gradient 0.
  nothing = np.zeros_like(image_mask)
  value, grad = jax.value_and_grad(lambda s: loss(s, positives, image_mask=nothing))(
      jnp.asarray(scores, jnp.float32))
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)


def test_damsm_total_sums_word_and_sentence_losses():
  scores, positives, *_ = batch(seed=6)
  total, parts = L.damsm_total(scores, 0.5 * scores, positives, gamma3=10.0)
  np.testing.assert_allclose(parts["damsm_word"],
                             L.info_nce(scores, positives, temperature=0.1), rtol=1e-6)
  np.testing.assert_allclose(parts["damsm_sentence"],
                             L.info_nce(0.5 * scores, positives, temperature=0.1), rtol=1e-6)
  np.testing.assert_allclose(total, parts["damsm_word"] + parts["damsm_sentence"], rtol=1e-6)


def test_registry_errors_name_what_is_accepted():
  with pytest.raises(ValueError, match="unknown loss 'triplet'.*hinge_hardest"):
    L.get_loss("triplet")
  with pytest.raises(ValueError, match="no hyper-parameter.*tau.*temperature"):
    L.get_loss("info_nce", tau=0.1)
  with pytest.raises(ValueError, match="reduction 'avg'"):
    L.hinge_sum(np.zeros((2, 2)), np.eye(2, dtype=bool), reduction="avg")
  with pytest.raises(ValueError, match=r"positives the same shape.*\(2, 2\).*\(2, 3\)"):
    L.info_nce(np.zeros((2, 2)), np.ones((2, 3), bool))


# ---- momentum queue (CODER-style) ----

def test_queue_is_a_ring_buffer_of_keys_ids_and_validity():
  queue = Q.init_queue(5, 2)
  assert not np.any(queue.valid)
  keys = np.arange(6, dtype=np.float32).reshape(3, 2)
  queue = Q.update_queue(queue, keys, -keys, np.array([10, 11, 12]))
  queue = jax.jit(Q.update_queue)(queue, keys + 100, -keys - 100, np.array([20, 21, 22]),
                                  np.array([True, False, True]))
  # Slots 0-2 got the first batch, then 3, 4 and (wrapping) 0 the second.
  np.testing.assert_array_equal(queue.image_ids, [22, 11, 12, 20, 21])
  np.testing.assert_array_equal(queue.valid, [True, True, True, True, False])
  np.testing.assert_array_equal(queue.images[0], keys[2] + 100)
  np.testing.assert_array_equal(queue.texts[3], -keys[0] - 100)
  assert int(queue.position) == 1
  with pytest.raises(ValueError, match="batch of 6 does not fit a queue of 5"):
    Q.update_queue(queue, np.zeros((6, 2)), np.zeros((6, 2)), np.zeros(6, int))


def test_queue_loss_matches_a_loop_and_ignores_same_image_entries():
  rng = np.random.default_rng(7)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  images, texts = unit(rng.normal(size=(3, 4))), unit(rng.normal(size=(3, 4)))
  ids = np.array([0, 0, 1])  # rows 0 and 1 show the same image
  queue = Q.init_queue(4, 4)
  # An empty queue: the in-batch DCL.
  empty = Q.queue_loss(images, texts, ids, queue, temperature=0.2, beta=3.0)
  np.testing.assert_allclose(
      empty, L.dcl(images @ texts.T, ids[:, None] == ids[None, :], temperature=0.2,
                   beta=3.0), rtol=1e-5)
  q_images, q_texts = unit(rng.normal(size=(3, 4))), unit(rng.normal(size=(3, 4)))
  queue = Q.update_queue(queue, q_images, q_texts, np.array([5, 6, 1]))
  got = Q.queue_loss(images, texts, ids, queue, temperature=0.2, beta=3.0)

  def direction(queries, keys, queued):
    terms = []
    for a in range(3):
      for c in range(3):
        if ids[a] != ids[c]:
          continue
        neg = [queries[a] @ keys[j] for j in range(3) if ids[j] != ids[a]]
        neg += [queries[a] @ queued[k] for k in range(3) if [5, 6, 1][k] != ids[a]]
        terms.append(ref_dcl(queries[a] @ keys[c], np.array(neg), 0.2, 3.0))
    return np.mean(terms)

  want = direction(images, texts, q_texts) + direction(texts, images, q_images)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # A queued entry of the anchors' own image is no negative: with every row
  # showing image 1, moving the queued pair of image 1 changes nothing.
  same = np.array([1, 1, 1])
  moved = queue._replace(texts=queue.texts.at[2].set(images[0]),
                         images=queue.images.at[2].set(texts[0]))
  kw = dict(temperature=0.2, beta=3.0)
  np.testing.assert_allclose(Q.queue_loss(images, texts, same, moved, **kw),
                             Q.queue_loss(images, texts, same, queue, **kw), rtol=1e-6)
  assert abs(float(Q.queue_loss(images, texts, ids, moved, **kw)) - float(got)) > 1e-3


def test_momentum_update_is_an_ema():
  out = Q.momentum_update({"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, 0.9)
  np.testing.assert_allclose(out["w"], [0.9, 0.9])


# ---- hardest negatives (MVPTR) ----

def test_hardest_negatives_skip_positives_and_padding():
  scores = np.array([[0.9, 0.8, 0.1, 0.7],
                     [0.95, 0.2, 0.3, 0.99],
                     [0.5, 0.6, 0.4, 0.1]])
  positives = np.array([[True, True, False, False],  # image 0: captions 0, 1
                        [False, False, True, False],
                        [False, False, False, True]])
  text_mask = np.array([True, True, True, False])  # caption 3 is padding
  txt, img, img_found, txt_found = jax.jit(hard_negatives.hardest_negatives)(
      scores, positives, text_mask=text_mask)
  np.testing.assert_array_equal(txt, [2, 0, 1])  # image 0 may only take caption 2
  np.testing.assert_array_equal(img, [1, 2, 2, -1])
  np.testing.assert_array_equal(img_found, [True, True, True])
  np.testing.assert_array_equal(txt_found, [True, True, True, False])
