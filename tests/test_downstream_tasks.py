"""Tests for the fine-tuning objectives: vqa, grounding, retrieval_ft, distill.

Each loss runs on a fake model whose outputs the test chooses (as in
test_tasks.py) and is compared with an independent numpy computation; the
retrieval fakes score a (caption, image) pair by looking up the row ids written
into the caption ([CLS] slot) and the image (first box feature), so the hard
negatives the loss must pick are known in numpy. The last tests train the real
tiny models for 30 steps on a fixed batch and require each loss to fall.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vlp import tasks
from vlp.models.downstream import UniterForGrounding, UniterForRetrieval, UniterForVqa
from vlp.models.uniter_config import model_config
from vlp.tasks import distill, grounding, retrieval_ft, vqa

from loss_harness import run_loss


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


@jax.tree_util.register_pytree_node_class
class FakeHeads:
  """`encode` returns the chosen head outputs; `dropout` as in test_tasks.FakeModel."""

  def __init__(self, outputs, *, dropout=None):
    self.outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()}
    self.dropout = dropout

  def tree_flatten(self):
    return (self.outputs,), self.dropout

  @classmethod
  def tree_unflatten(cls, dropout, leaves):
    model = object.__new__(cls)
    model.outputs, model.dropout = leaves[0], dropout
    return model

  def encode(self, batch, *, rngs=None):
    if self.dropout is not None:
      assert isinstance(rngs, nnx.Rngs) if self.dropout else rngs is None
    if rngs is not None:
      rngs.dropout()
    return dict(self.outputs)


# ---------------------------------------------------------------- VQA

def _vqa_case():
  logits = np.array([[0.0, 2.0, -1.0, 0.5], [1.0, 0.0, 0.0, -3.0]], np.float32)
  targets = np.array([[0.0, 1.0, 0.3, 0.0], [0.6, 0.0, 0.0, 0.9]], np.float32)
  batch = {"input_ids": np.ones((2, 3), np.int32),
           "vqa_targets": targets, "example_mask": np.array([True, True])}
  return logits, targets, batch


def _bce_numpy(x, y):
  x, y = x.astype(np.float64), y.astype(np.float64)
  return -(y * np.log(_sigmoid(x)) + (1 - y) * np.log(1 - _sigmoid(x)))


def test_vqa_bce_times_num_answers_and_score():
  logits, targets, batch = _vqa_case()
  (loss, metrics), grads = run_loss(vqa.vqa_loss, FakeHeads({"vqa_logits": logits}, dropout=True),
                                batch, jax.random.key(0), grad=True)
  # Mean over all 2 x 4 cells, times 4 answers.
  np.testing.assert_allclose(loss, _bce_numpy(logits, targets).mean() * 4, rtol=1e-6)
  # Argmax answers: 1 (score 1.0) and 0 (score 0.6).
  np.testing.assert_allclose(metrics["vqa_score"], 0.8, rtol=1e-6)
  assert set(metrics) == {"loss/vqa", "vqa_score"} and loss.dtype == jnp.float32
  # d/dx = (sigmoid(x) - y) / number of questions.
  np.testing.assert_allclose(grads.outputs["vqa_logits"], (_sigmoid(logits) - targets) / 2,
                             rtol=1e-5, atol=1e-7)


def test_vqa_example_mask_and_extreme_logits():
  logits, targets, batch = _vqa_case()
  logits[1] = [500.0, -500.0, 1e4, 0.0]  # padded row: garbage, must not matter
  batch = dict(batch, example_mask=np.array([True, False]))
  loss, metrics = run_loss(vqa.vqa_loss, FakeHeads({"vqa_logits": logits}), batch)
  np.testing.assert_allclose(loss, _bce_numpy(logits[0], targets[0]).sum(), rtol=1e-6)
  np.testing.assert_allclose(metrics["vqa_score"], 1.0)
  # Large logits stay finite (stable form): bce(100, 0) = 100, bce(-100, 1) = 100.
  big = {"vqa_logits": np.array([[100.0, -100.0, 0.0, 0.0]] * 2, np.float32)}
  hard = dict(batch, vqa_targets=np.array([[0, 1, 0, 0]] * 2, np.float32))
  loss, _ = run_loss(vqa.vqa_loss, FakeHeads(big), hard)
  np.testing.assert_allclose(loss, 200.0 + 2 * np.log(2.0), rtol=1e-6)


# ---------------------------------------------------------------- grounding

def _grounding_case():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(3, 5)).astype(np.float32)
  img_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  scores[1, 4] = scores[2, 3] = 50.0  # padded regions with the highest scores
  batch = {"input_ids": np.ones((3, 4), np.int32), "img_mask": img_mask,
           "target_region": np.array([2, 1, 0], np.int32),
           "example_mask": np.array([True, True, True])}
  return scores, batch


def _region_ce(scores, mask, target):
  logp = np.log(_softmax(scores[mask].astype(np.float64)))
  return -logp[target]


def test_grounding_masked_ce_sum_and_mean():
  scores, batch = _grounding_case()
  model = FakeHeads({"region_scores": scores}, dropout=False)
  ce = [_region_ce(scores[b], batch["img_mask"][b], t)
        for b, t in enumerate(batch["target_region"])]
  loss, metrics = run_loss(grounding.grounding_loss, model, batch)
  np.testing.assert_allclose(loss, np.sum(ce), rtol=1e-5)
  np.testing.assert_allclose(metrics["grounding_ce"], np.mean(ce), rtol=1e-5)
  loss_mean, _ = run_loss(grounding.grounding_loss, model, batch, reduction="mean")
  np.testing.assert_allclose(loss_mean, np.mean(ce), rtol=1e-5)
  # Accuracy over real regions only: the 50.0 padded scores are never predicted.
  pred = [np.argmax(np.where(m, s, -np.inf)) for s, m in zip(scores, batch["img_mask"])]
  want = np.mean(np.array(pred) == batch["target_region"])
  np.testing.assert_allclose(metrics["grounding_acc"], want)
  assert pred[2] == 0
  with pytest.raises(ValueError, match="reduction"):
    grounding.grounding_loss(model, batch, None, reduction="max")


def test_grounding_example_mask_and_padded_region_gradient():
  scores, batch = _grounding_case()
  masked = dict(batch, example_mask=np.array([True, False, True]))
  (loss, metrics), grads = run_loss(grounding.grounding_loss, FakeHeads({"region_scores": scores}),
                                masked, grad=True)
  ce = [_region_ce(scores[b], batch["img_mask"][b], batch["target_region"][b])
        for b in (0, 2)]
  np.testing.assert_allclose(loss, np.sum(ce), rtol=1e-5)
  g = np.asarray(grads.outputs["region_scores"])
  assert np.all(g[1] == 0)  # the padded example
  assert np.all(g[~batch["img_mask"]] == 0)  # padded regions
  # d CE / d s = softmax - onehot on the real regions of example 0.
  p = _softmax(scores[0].astype(np.float64))
  np.testing.assert_allclose(g[0], p - np.eye(5)[2], rtol=1e-5, atol=1e-7)
  # Example 2 has one real region, so it is right despite its padded 50.0.
  np.testing.assert_allclose(metrics["grounding_acc"],
                             np.mean([np.argmax(scores[0]) == 2, True]))


# ---------------------------------------------------------------- retrieval fakes

@jax.tree_util.register_pytree_node_class
class FakeRanker:
  """Scores pair (caption of row t, image of row v) as `m_eval[t, v]` without
  dropout and `m_train[t, v]` with it; the dual encodings are rows of `txt_emb` /
  `img_emb`, normalised. Row ids travel in input_ids[:, 0] and img_pos[:, 0, 0]."""

  def __init__(self, m_eval, m_train=None, txt_emb=None, img_emb=None):
    self.m_eval = jnp.asarray(m_eval, jnp.float32)
    self.m_train = self.m_eval if m_train is None else jnp.asarray(m_train, jnp.float32)
    n = self.m_eval.shape[0]
    self.txt_emb = jnp.zeros((n, 2)) if txt_emb is None else jnp.asarray(txt_emb, jnp.float32)
    self.img_emb = jnp.zeros((n, 2)) if img_emb is None else jnp.asarray(img_emb, jnp.float32)

  def tree_flatten(self):
    return (self.m_eval, self.m_train, self.txt_emb, self.img_emb), None

  @classmethod
  def tree_unflatten(cls, _, leaves):
    model = object.__new__(cls)
    model.m_eval, model.m_train, model.txt_emb, model.img_emb = leaves
    return model

  @staticmethod
  def _ids(batch):
    return (jnp.asarray(batch["input_ids"])[:, 0],
            jnp.asarray(batch["img_pos"])[:, 0, 0].astype(jnp.int32))

  def encode(self, batch, *, rngs=None):
    t, v = self._ids(batch)
    m = self.m_eval if rngs is None else self.m_train
    if rngs is not None:
      rngs.dropout()
    return {"rank_scores": m[t, v]}

  def encode_text(self, batch, *, rngs=None):
    e = self.txt_emb[self._ids(batch)[0]]
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

  def encode_image(self, batch, *, rngs=None):
    e = self.img_emb[self._ids(batch)[1]]
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def _pairs_batch(n, *, example_mask=None, image_id=None, ids=None):
  ids = np.arange(n) if ids is None else np.asarray(ids)
  batch = {"input_ids": np.zeros((n, 3), np.int32), "txt_mask": np.ones((n, 3), bool),
           "img_feat": np.zeros((n, 2, 4), np.float32),
           "img_pos": np.zeros((n, 2, 7), np.float32), "img_mask": np.ones((n, 2), bool),
           "example_mask": np.ones(n, bool) if example_mask is None else example_mask}
  batch["input_ids"][:, 0] = ids
  batch["img_pos"][:, 0, 0] = ids
  if image_id is not None:
    batch["image_id"] = np.asarray(image_id, np.int64)
  return batch


def _retrieval_numpy(m_eval, m_train, real, image_id, n, anchors, margin=0.2):
  """Reference loss and the (caption, image) pairs each direction picks."""
  b = len(real)
  image_id = np.arange(b) if image_id is None else np.asarray(image_id)
  losses, picked = {}, {"t2i": set(), "i2t": set()}
  for name in ("t2i", "i2t"):
    per_anchor = []
    for a in anchors:
      if not real[a]:
        continue
      cands = [j for j in range(b) if real[j] and j != a and image_id[j] != image_id[a]]
      ev = (lambda j: m_eval[a, j]) if name == "t2i" else (lambda j: m_eval[j, a])
      order = np.array(cands)[np.argsort([-ev(j) for j in cands], kind="stable")][:n]
      pairs = [(a, j) if name == "t2i" else (j, a) for j in order]
      picked[name].update(pairs)
      pos = _sigmoid(m_train[a, a])
      hinge = [max(0.0, margin + _sigmoid(m_train[p]) - pos) for p in pairs]
      per_anchor.append(np.mean(hinge) if hinge else 0.0)
    losses[name] = np.mean(per_anchor) if per_anchor else 0.0
  return losses, picked


def _rand(b, seed):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, b)).astype(np.float32), rng.normal(size=(b, b)).astype(np.float32)


# ---------------------------------------------------------------- retrieval_ft

def test_hardest_negatives_are_top_scored_valid_candidates():
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(6, 9)).astype(np.float32)
  valid = rng.random((6, 9)) < 0.6
  valid[4] = False
  valid[4, [2, 7]] = True  # fewer valid candidates than asked for
  idx, w, top = jax.jit(retrieval_ft.hardest_negatives, static_argnums=2)(scores, valid, 4)
  idx, w, top = np.asarray(idx), np.asarray(w), np.asarray(top)
  for r in range(6):
    order = [j for j in np.argsort(-scores[r], kind="stable") if valid[r, j]][:4]
    k = len(order)
    np.testing.assert_array_equal(idx[r, :k], order)
    np.testing.assert_array_equal(w[r], [1.0] * k + [0.0] * (4 - k))
    np.testing.assert_allclose(top[r, :k], scores[r, order])
    assert np.all(valid[r, idx[r, :k]])
  assert w[4].sum() == 2


def test_candidate_mask_excludes_self_padding_and_same_image():
  batch = _pairs_batch(4, example_mask=np.array([1, 1, 1, 0], bool), image_id=[7, 7, 8, 9])
  got = np.asarray(retrieval_ft.candidate_mask(batch, jnp.arange(4)))
  want = np.array([[0, 0, 1, 0],
                   [0, 0, 1, 0],
                   [1, 1, 0, 0],
                   [1, 1, 1, 0]], bool)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("num_anchors,chunk", [(0, 0), (3, 5)])
def test_retrieval_ft_matches_numpy(num_anchors, chunk):
  b, n = 7, 3
  m_eval, m_train = _rand(b, 0)
  loss, metrics = run_loss(retrieval_ft.retrieval_ft_loss, FakeRanker(m_eval, m_train),
                       _pairs_batch(b), jax.random.key(0), num_hard_negatives=n,
                       num_anchors=num_anchors, score_chunk=chunk)
  anchors = range(num_anchors or b)
  want, _ = _retrieval_numpy(m_eval, m_train, np.ones(b, bool), None, n, anchors)
  np.testing.assert_allclose(metrics["loss/retrieval_ft_t2i"], want["t2i"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/retrieval_ft_i2t"], want["i2t"], rtol=1e-5)
  np.testing.assert_allclose(loss, want["t2i"] + want["i2t"], rtol=1e-5)
  # Selection follows the eval scores: picking by the train scores would differ.
  by_train, _ = _retrieval_numpy(m_train, m_train, np.ones(b, bool), None, n, anchors)
  assert abs(by_train["t2i"] + by_train["i2t"] - float(loss)) > 1e-3
  # In-batch R@1 of the eval scores.
  ir = np.mean([m_eval[a, a] > np.delete(m_eval[a], a).max() for a in anchors])
  tr = np.mean([m_eval[a, a] > np.delete(m_eval[:, a], a).max() for a in anchors])
  np.testing.assert_allclose(metrics["retrieval_ft_ir_r1"], ir)
  np.testing.assert_allclose(metrics["retrieval_ft_tr_r1"], tr)


def test_retrieval_ft_padding_and_same_image_rows():
  b, n = 6, 2
  m_eval, m_train = _rand(b, 1)
  real = np.array([1, 1, 1, 1, 1, 0], bool)
  image_id = [10, 11, 10, 12, 13, 14]  # rows 0 and 2 show the same image
  # Make the forbidden candidates the most attractive ones.
  m_eval[:, 5] = m_eval[5, :] = 9.0
  m_eval[0, 2] = m_eval[2, 0] = 8.0
  batch = _pairs_batch(b, example_mask=real, image_id=image_id)
  loss, metrics = run_loss(retrieval_ft.retrieval_ft_loss, FakeRanker(m_eval, m_train), batch,
                       jax.random.key(0), num_hard_negatives=n)
  want, picked = _retrieval_numpy(m_eval, m_train, real, image_id, n, range(b))
  np.testing.assert_allclose(loss, want["t2i"] + want["i2t"], rtol=1e-5)
  for pairs in picked.values():
    assert not any(5 in p for p in pairs) and (0, 2) not in pairs and (2, 0) not in pairs
  # Dropping the padded row from the batch altogether gives the same loss.
  keep = np.flatnonzero(real)
  small = _pairs_batch(len(keep), image_id=np.asarray(image_id)[keep], ids=keep)
  loss_small, _ = run_loss(retrieval_ft.retrieval_ft_loss, FakeRanker(m_eval, m_train), small,
                       jax.random.key(0), num_hard_negatives=n)
  np.testing.assert_allclose(loss_small, loss, rtol=1e-6)


def test_retrieval_ft_gradient_reaches_exactly_the_trained_pairs():
  b, n = 6, 2
  m_eval, m_train = _rand(b, 2)
  (_, _), grads = run_loss(retrieval_ft.retrieval_ft_loss, FakeRanker(m_eval, m_train),
                       _pairs_batch(b), jax.random.key(0), grad=True, num_hard_negatives=n,
                       margin=3.0)  # every hinge active
  assert np.all(np.asarray(grads.m_eval) == 0)  # scoring pass is stop_gradient
  _, picked = _retrieval_numpy(m_eval, m_train, np.ones(b, bool), None, n, range(b), 3.0)
  expected = picked["t2i"] | picked["i2t"] | {(a, a) for a in range(b)}
  nonzero = {tuple(p) for p in np.argwhere(np.asarray(grads.m_train) != 0)}
  assert nonzero == expected


# ---------------------------------------------------------------- distill

def _distill_numpy(teacher, cos, real, image_id, *, scale=6.0, tau_t=1.0, w_kd=1.0,
                   w_nce=0.0, tau_c=0.05):
  b = len(real)
  image_id = np.arange(b) if image_id is None else np.asarray(image_id)
  cols = np.flatnonzero(real)

  def kl(t_row, s_row):
    p, q = _softmax(t_row[cols] / tau_t), _softmax(s_row[cols] * scale)
    return np.sum(p * (np.log(p) - np.log(q)))

  def nce(row, pos):
    p = _softmax(row[cols] / tau_c)
    return -np.log(np.sum(p[pos[cols]]))

  same = image_id[:, None] == image_id[None, :]
  kd = (np.mean([kl(teacher[i], cos[i]) for i in cols])
        + np.mean([kl(teacher[:, j], cos[:, j]) for j in cols]))
  nc = (np.mean([nce(cos[i], same[i]) for i in cols])
        + np.mean([nce(cos[:, j], same[:, j]) for j in cols]))
  return w_kd * kd + w_nce * nc, kd, nc


def _emb(b, seed):
  rng = np.random.default_rng(seed)
  t, v = rng.normal(size=(b, 4)), rng.normal(size=(b, 4))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  return t.astype(np.float32), v.astype(np.float32), unit(t) @ unit(v).T


def test_distill_kl_and_contrastive_match_numpy():
  b = 5
  m_eval, _ = _rand(b, 4)
  t, v, cos = _emb(b, 5)
  real = np.array([1, 1, 1, 0, 1], bool)
  image_id = [3, 4, 3, 5, 6]
  model = FakeRanker(m_eval * 3.0, txt_emb=t, img_emb=v)
  batch = _pairs_batch(b, example_mask=real, image_id=image_id)
  (loss, metrics), grads = run_loss(distill.distill_loss, model, batch, jax.random.key(1),
                                grad=True, contrastive_weight=0.5, teacher_temperature=2.0)
  want, kd, nc = _distill_numpy(m_eval * 3.0, cos, real, image_id, tau_t=2.0, w_nce=0.5)
  np.testing.assert_allclose(metrics["loss/distill_kd"], kd, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/distill_nce"], nc, rtol=1e-5)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert np.all(np.asarray(grads.m_eval) == 0) and np.all(np.asarray(grads.m_train) == 0)
  assert np.abs(np.asarray(grads.txt_emb)[real]).max() > 0
  assert np.all(np.asarray(grads.txt_emb)[~real] == 0)  # the padded row
  # Without the contrastive weight the term is not computed.
  loss_kd, m = run_loss(distill.distill_loss, model, batch, None, teacher_temperature=2.0)
  np.testing.assert_allclose(loss_kd, kd, rtol=1e-5)
  assert float(m["loss/distill_nce"]) == 0.0


def test_distill_is_zero_when_student_reproduces_teacher():
  b = 6
  t, v, cos = _emb(b, 6)
  model = FakeRanker(6.0 * cos, txt_emb=t, img_emb=v)
  loss, metrics = run_loss(distill.distill_loss, model, _pairs_batch(b), None)
  assert abs(float(loss)) < 1e-5
  np.testing.assert_allclose(metrics["distill_top1_agree"], 1.0)
  ir = np.mean(np.argmax(cos, axis=1) == np.arange(b))
  np.testing.assert_allclose(metrics["distill_ir_r1"], ir)
  # A precomputed teacher in the batch replaces the cross-encoder.
  other = dict(_pairs_batch(b), teacher_scores=np.zeros((b, b), np.float32))
  loss_u, _ = run_loss(distill.distill_loss, model, other, None)
  want, _, _ = _distill_numpy(np.zeros((b, b)), cos, np.ones(b, bool), None)
  np.testing.assert_allclose(loss_u, want, rtol=1e-5)
  assert float(loss_u) > 0.01


# ---------------------------------------------------------------- registry

def test_registry_has_finetuning_tasks():
  kinds = {n: tasks.TASKS[n].batch_kind for n in tasks.FINETUNING_TASKS}
  assert kinds == {"vqa": "vqa", "grounding": "re", "retrieval_ft": "retrieval",
                   "distill": "retrieval"}
  assert tasks.make_loss_fn("vqa") is vqa.vqa_loss
  fn = tasks.make_loss_fn("retrieval_ft", num_hard_negatives=1, margin=0.5)
  assert fn.keywords == {"num_hard_negatives": 1, "margin": 0.5}
  with pytest.raises(TypeError, match="wra_weight"):
    tasks.make_loss_fn("distill", wra_weight=0.1)
  assert set(tasks.PRETRAINING_TASKS) | set(tasks.FINETUNING_TASKS) == set(tasks.TASKS)


# ---------------------------------------------------------------- learning

# A wide initialisation makes the tiny encoder's output depend on the image early
# enough for 30 steps; at 0.02 the pair scores differ by ~1e-4 and the
# sigmoid-hinge ranking loss does not move within 30 steps.
TINY = dict(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, img_dim=16,
            vocab_size=40, max_position_embeddings=8, hidden_dropout=0.0,
            attention_dropout=0.0, initializer_range=0.2)
BL, TL, KL = 6, 5, 4


def _real_batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"input_ids": rng.integers(1, TINY["vocab_size"], (BL, TL)).astype(np.int32),
          "txt_mask": np.ones((BL, TL), bool),
          "img_feat": rng.normal(size=(BL, KL, TINY["img_dim"])).astype(np.float32),
          "img_pos": rng.random((BL, KL, 7)).astype(np.float32),
          "img_mask": np.arange(KL)[None].repeat(BL, 0) < rng.integers(2, KL + 1, (BL, 1)),
          "example_mask": np.ones(BL, bool)}


def _losses_over_training(model, loss_fn, batch, steps=30, lr=1e-3):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(lr)

  def loss_of(p, rng):
    return loss_fn(nnx.merge(graphdef, p, rest), batch, rng)[0]

  @jax.jit
  def step(p, opt, rng):
    loss, g = jax.value_and_grad(loss_of)(p, rng)
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  opt = tx.init(params)
  losses = []
  for i in range(steps):
    params, opt, loss = step(params, opt, jax.random.key(i))
    losses.append(float(loss))
  return losses


_LEARNING = {
    "vqa": (lambda c: UniterForVqa(c, num_answers=7, rngs=nnx.Rngs(0)),
            lambda b, r: dict(b, vqa_targets=(r.random((BL, 7)) < 0.3) * r.random((BL, 7)))),
    "grounding": (lambda c: UniterForGrounding(c, rngs=nnx.Rngs(0)),
                  lambda b, r: dict(b, target_region=np.zeros(BL, np.int32))),
    "retrieval_ft": (lambda c: UniterForRetrieval(c, rngs=nnx.Rngs(0)), lambda b, r: b),
    "distill": (lambda c: UniterForRetrieval(c, dual_dim=8, rngs=nnx.Rngs(0)),
                lambda b, r: b),
}


@pytest.mark.parametrize("name", sorted(_LEARNING))
def test_each_loss_falls_on_a_fixed_batch(name):
  make, extend = _LEARNING[name]
  batch = extend(_real_batch(), np.random.default_rng(1))
  batch = {k: np.asarray(v, np.float32) if k == "vqa_targets" else v for k, v in batch.items()}
  # score_chunk=16 scores the 36 pairs in 3 lax.map chunks (the last one padded).
  kwargs = {"retrieval_ft": dict(num_hard_negatives=2, score_chunk=16)}.get(name, {})
  loss_fn = tasks.make_loss_fn(name, **kwargs)
  losses = _losses_over_training(make(model_config("tiny", **TINY)), loss_fn, batch)
  assert all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
