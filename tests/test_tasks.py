"""Tests for vlp.tasks: each loss against a hand computation on a fake model.

The fake model returns a sequence we choose and its heads are fixed linear maps
(identity unless stated), so every logit the loss sees is known in the test.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlp import tasks
from vlp.tasks import itm, mlm, mrm

from loss_harness import run_loss

B, T, K, H = 2, 4, 3, 5


@jax.tree_util.register_pytree_node_class
class FakeModel:
  """Stands in for UniterForPretraining and checks how the loss calls it.

  A pytree (arrays = leaves, expectations = static aux data), so one jitted
  loss serves every fake model of the same shapes.

  Attributes:
    head_shape: if set, the shape every head must be called with.
    dropout: if set, whether `encode` must get an `nnx.Rngs` (True) or None.
  """

  def __init__(self, sequence, itm_logits=None, head=None, *, head_shape=None,
               dropout=None):
    self.sequence = jnp.asarray(sequence, jnp.float32)
    self.itm = (jnp.zeros((self.sequence.shape[0], 2)) if itm_logits is None
                else jnp.asarray(itm_logits, jnp.float32))
    self.head = jnp.eye(self.sequence.shape[-1]) if head is None else head
    self.head_shape, self.dropout = head_shape, dropout

  def tree_flatten(self):
    return (self.sequence, self.itm, self.head), (self.head_shape, self.dropout)

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    model = object.__new__(cls)
    model.sequence, model.itm, model.head = leaves
    model.head_shape, model.dropout = aux
    return model

  def encode(self, batch, *, rngs=None):
    assert batch["input_ids"].shape[1] + batch["img_mask"].shape[1] == (
        self.sequence.shape[1])
    if self.dropout is not None:
      assert isinstance(rngs, nnx.Rngs) if self.dropout else rngs is None
    if rngs is not None:
      rngs.dropout()  # as the real model's dropout layers would
    return {"sequence": self.sequence, "pooled": self.sequence[:, 0],
            "itm_logits": self.itm}

  def _head(self, h):
    if self.head_shape is not None:
      assert h.shape == self.head_shape, h.shape
    return h @ self.head

  mlm_logits = mrfr_prediction = mrc_logits = _head


def _batch(**extra):
  batch = {"input_ids": np.ones((B, T), np.int32),
           "txt_mask": np.ones((B, T), bool),
           "img_mask": np.ones((B, K), bool)}
  batch.update(extra)
  return batch


def _seq(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(B, T + K, H)).astype(np.float32)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------- MLM

_MLM = dict(mlm_positions=np.array([[1, 2], [3, 0]], np.int32),
            mlm_labels=np.array([[2, 4], [1, -1]], np.int32),
            mlm_weights=np.array([[1, 1], [1, 0]], np.float32))


def test_mlm_uniform_logits_give_log_vocab():
  loss, metrics = run_loss(mlm.mlm_loss, FakeModel(np.zeros((B, T + K, H))),
                               _batch(**_MLM))
  np.testing.assert_allclose(loss, np.log(H), rtol=1e-6)
  assert set(metrics) == {"loss/mlm", "mlm_acc"}


def test_mlm_matches_numpy_and_skips_unused_slots():
  seq = _seq()
  # The head only sees the gathered slots; no rng -> deterministic encode.
  model = FakeModel(seq, head_shape=(B, 2, H), dropout=False)
  loss, metrics = run_loss(mlm.mlm_loss, model, _batch(**_MLM))
  # Masked tokens: (b0, pos1, label2), (b0, pos2, label4), (b1, pos3, label1).
  ce = [-_log_softmax(seq[b, p])[y]
        for b, p, y in [(0, 1, 2), (0, 2, 4), (1, 3, 1)]]
  np.testing.assert_allclose(loss, np.mean(ce), rtol=1e-5)

  # Accuracy: make the labels of two of the three masked tokens the argmax.
  seq2 = np.zeros((B, T + K, H), np.float32)
  seq2[0, 1, 2] = seq2[0, 2, 0] = seq2[1, 3, 1] = 5.0
  _, metrics = run_loss(mlm.mlm_loss, FakeModel(seq2), _batch(**_MLM))
  np.testing.assert_allclose(metrics["mlm_acc"], 2 / 3, rtol=1e-6)
  assert metrics["loss/mlm"].dtype == jnp.float32

  # The unused slot (b1, pos0) and region slots do not matter.
  seq3 = seq.copy()
  seq3[1, 0] = 1e3
  seq3[:, T:] = -7.0
  np.testing.assert_allclose(
      run_loss(mlm.mlm_loss, FakeModel(seq3), _batch(**_MLM))[0], loss, rtol=1e-6)


def test_example_mask_drops_padded_examples():
  seq = _seq()
  batch = _batch(example_mask=np.array([True, False]), **_MLM)
  loss, _ = run_loss(mlm.mlm_loss, FakeModel(seq), batch)
  ce = [-_log_softmax(seq[0, p])[y] for p, y in [(1, 2), (2, 4)]]
  np.testing.assert_allclose(loss, np.mean(ce), rtol=1e-5)


def test_no_masked_slot_gives_zero_not_nan():
  batch = _batch(**dict(_MLM, mlm_weights=np.zeros((B, 2), np.float32)))
  loss, metrics = run_loss(mlm.mlm_loss, FakeModel(_seq()), batch)
  assert float(loss) == 0.0 and float(metrics["mlm_acc"]) == 0.0


def test_rng_reaches_encode_as_dropout_stream():
  model = FakeModel(_seq(), dropout=True)  # asserts it gets an nnx.Rngs
  loss, _ = run_loss(mlm.mlm_loss, model, _batch(**_MLM), jax.random.key(0))
  assert np.isfinite(loss)


# ---------------------------------------------------------------- MRM

# Region slot indices (0..K-1, i.e. sequence positions T + index).
_MRM = dict(mrm_positions=np.array([[2, 0], [1, 1]], np.int32),
            mrm_weights=np.array([[1, 1], [1, 0]], np.float32),
            img_masked=np.array([[1, 0, 1], [0, 1, 0]], bool))
_USED = [(0, 0, 2), (0, 1, 0), (1, 0, 1)]  # (example, slot, region index)


def test_mrfr_mean_over_regions_and_features():
  seq = _seq()
  d = 3
  head = jnp.asarray(np.random.default_rng(1).normal(size=(H, d)), jnp.float32)
  target = np.random.default_rng(2).normal(size=(B, 2, d)).astype(np.float32)
  model = FakeModel(seq, head=head, head_shape=(B, 2, H))
  loss, metrics = run_loss(mrm.mrfr_loss, model, _batch(mrfr_target=target, **_MRM))
  sq = [np.sum((seq[b, T + r] @ np.asarray(head) - target[b, s]) ** 2)
        for b, s, r in _USED]
  np.testing.assert_allclose(loss, np.sum(sq) / (3 * d), rtol=1e-5)
  assert set(metrics) == {"loss/mrfr"}


def test_mrc_uses_argmax_without_background():
  seq = _seq()
  target = np.zeros((B, 2, H), np.float32)
  # Background (class 0) is the largest everywhere; labels must skip it.
  target[..., 0] = 0.6
  target[0, 0, 3] = target[0, 1, 1] = target[1, 0, 4] = 0.3
  target[1, 1, 2] = 0.3  # unused slot
  loss, metrics = run_loss(mrm.mrc_loss, FakeModel(seq),
                       _batch(mrc_target=target, **_MRM))
  ce = [-_log_softmax(seq[b, T + r])[y]
        for (b, _, r), y in zip(_USED, [3, 1, 4])]
  np.testing.assert_allclose(loss, np.mean(ce), rtol=1e-5)
  assert set(metrics) == {"loss/mrc"}


def test_mrckl_elementwise_mean_with_zero_targets():
  seq = _seq()
  target = np.zeros((B, 2, H), np.float32)
  target[0, 0, :2] = [0.25, 0.75]
  target[0, 1, [0, 3, 4]] = [0.5, 0.25, 0.25]
  target[1, 0, 1] = 1.0
  target[1, 1] = 0.2  # unused slot
  loss, metrics = run_loss(mrm.mrckl_loss, FakeModel(seq),
                       _batch(mrc_target=target, **_MRM))
  kl = 0.0
  for b, s, r in _USED:
    t, logp = target[b, s], _log_softmax(seq[b, T + r].astype(np.float64))
    nz = t > 0
    kl += np.sum(t[nz] * (np.log(t[nz]) - logp[nz]))
  np.testing.assert_allclose(loss, kl / (3 * H), rtol=1e-5)
  assert set(metrics) == {"loss/mrckl"}
  # Zero targets must not turn into nan gradients.
  _, grads = run_loss(mrm.mrckl_loss, FakeModel(seq),
                  _batch(mrc_target=target, **_MRM), grad=True)
  assert np.isfinite(grads.sequence).all()


# ---------------------------------------------------------------- ITM + WRA

def _itm_case():
  """Two pairs whose OT distances are known in closed form.

  When each text token has the same cost to every region, d = mean over text
  tokens of that cost (the plan's text marginals are exactly 1/n_t).
  Example 0 (positive): text [e2, e1, e1] (3 real, incl. [CLS]/[SEP]), regions
  [e2, e2] -> costs 0, 1, 1 -> d0 = 2/3 (it would be 1 without [CLS]).
  Example 1 (negative): text [e1] * 4, regions [-e1] * 3 -> d1 = 2.
  """
  e1, e2 = np.eye(H)[0], np.eye(H)[1]
  seq = np.full((B, T + K, H), 9.0, np.float32)  # padding garbage
  seq[0, :3] = [e2, e1, e1]
  seq[0, T:T + 2] = e2
  seq[1, :T] = e1
  seq[1, T:] = -e1
  txt_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  img_mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
  logits = np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)
  # example_mask is always present so that all ITM cases share one compilation.
  batch = _batch(txt_mask=txt_mask, img_mask=img_mask,
                 itm_target=np.array([1, 0], np.int32),
                 example_mask=np.array([True, True]))
  return seq, logits, batch


def _itm(seq, logits, batch):
  """ITM loss with default hyper-parameters, a dropout rng and gradients."""
  return run_loss(itm.itm_loss, FakeModel(seq, logits, dropout=True), batch,
              jax.random.key(0), grad=True)


def test_itm_wra_sign_convention_and_total():
  seq, logits, batch = _itm_case()
  (loss, metrics), grads = _itm(seq, logits, batch)
  ce = np.mean([np.log1p(np.exp(-1.0)), np.log1p(np.exp(-2.0))])
  wra = (2 / 3 - 2.0) / B  # positives add, negatives subtract
  np.testing.assert_allclose(metrics["loss/itm_ce"], ce, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/wra"], wra, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + 0.1 * wra, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/itm"], loss)
  np.testing.assert_allclose(metrics["itm_acc"], 1.0)
  # Gradients reach real text and regions only, not the padding slots.
  assert np.all(np.isfinite(grads.sequence))
  # (at a perfectly (anti-)aligned pair the cosine has zero gradient, so look
  # at an orthogonal word and region)
  assert np.any(grads.sequence[0, 1] != 0)
  assert np.any(grads.sequence[0, T] != 0)
  assert np.all(grads.sequence[0, 3] == 0)
  assert np.all(grads.sequence[0, T + 2] == 0)

  # Flip the labels: the WRA term flips sign, accuracy drops to 0.
  flipped = dict(batch, itm_target=np.array([0, 1], np.int32))
  (_, metrics), _ = _itm(seq, logits, flipped)
  np.testing.assert_allclose(metrics["loss/wra"], -wra, rtol=1e-5)
  np.testing.assert_allclose(metrics["itm_acc"], 0.0)


def test_itm_example_mask_and_zero_weight():
  seq, logits, batch = _itm_case()
  masked = dict(batch, example_mask=np.array([True, False]))
  (loss, metrics), _ = _itm(seq, logits, masked)
  ce = np.log1p(np.exp(-1.0))
  np.testing.assert_allclose(metrics["loss/wra"], 2 / 3, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + 0.1 * 2 / 3, rtol=1e-5)

  loss, metrics = run_loss(itm.itm_loss, FakeModel(seq, logits), batch,
                       wra_weight=0.0)
  assert float(metrics["loss/wra"]) == 0.0
  np.testing.assert_allclose(loss, metrics["loss/itm_ce"])


# ---------------------------------------------------------------- registry

def test_registry():
  assert set(tasks.PRETRAINING_TASKS) == {"mlm", "mrfr", "mrc", "mrckl", "itm"}
  kinds = {name: tasks.TASKS[name].batch_kind for name in tasks.PRETRAINING_TASKS}
  assert kinds == {"mlm": "mlm", "mrfr": "mrm", "mrc": "mrm", "mrckl": "mrm",
                   "itm": "itm"}
  assert all(t.name == name for name, t in tasks.TASKS.items())
  assert tasks.make_loss_fn("mlm") is mlm.mlm_loss

  seq, logits, batch = _itm_case()
  fn = tasks.make_loss_fn("itm", wra_weight=0.5)
  loss, metrics = run_loss(fn, FakeModel(seq, logits), batch)
  np.testing.assert_allclose(
      loss, metrics["loss/itm_ce"] + 0.5 * metrics["loss/wra"], rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/wra"], (2 / 3 - 2.0) / B, rtol=1e-5)

  with pytest.raises(TypeError, match="bogus"):
    tasks.make_loss_fn("itm", bogus=1)
  with pytest.raises(TypeError):
    tasks.make_loss_fn("mlm", wra_weight=0.1)
  with pytest.raises(KeyError):
    tasks.make_loss_fn("no_such_task")


# ------------------------------------------------- ITM with hardest negatives

class FakeBackbone:
  """`model.uniter` of a fake model: a text-only call (no regions) returns the
  chosen text states, an image-only call ([CLS] + regions) [0 | region states]."""

  def __init__(self, text, regions):
    self.text, self.regions = jnp.asarray(text), jnp.asarray(regions)

  def __call__(self, input_ids, txt_mask, img_feat, img_pos, img_mask, **kwargs):
    if img_feat.shape[1] == 0:
      return self.text, None
    cls = jnp.zeros_like(self.regions[:, :1])
    return jnp.concatenate([cls, self.regions], axis=1), None


class RecordingModel:
  """Fake model whose `encode` keeps the batch it was given (eager calls only)."""

  def __init__(self, text, regions):
    self.uniter = FakeBackbone(text, regions)
    self.seen = None

  def encode(self, batch, *, rngs=None):
    self.seen = batch
    rows, length = batch["input_ids"].shape[0], batch["input_ids"].shape[1]
    sequence = jnp.zeros((rows, length + batch["img_mask"].shape[1], H))
    return {"sequence": sequence, "pooled": sequence[:, 0],
            "itm_logits": jnp.zeros((rows, 2))}


def test_itm_hardest_negatives_pair_each_anchor_with_its_closest_other_image_or_caption():
  rows, length, regions_per_image = 6, 2, 2
  rng = np.random.default_rng(12)
  text = rng.normal(size=(rows, length, H)).astype(np.float32)
  regions = rng.normal(size=(rows, regions_per_image, H)).astype(np.float32)
  regions[3] = text[0]  # image of row 3 is the closest to caption 0 ...
  image_id = np.array([0, 1, 2, 0, 3, 4])  # ... but shows the same image (id 0)
  real = np.array([True] * 5 + [False])  # row 5 is padding
  batch = {"input_ids": np.repeat(np.arange(rows)[:, None], length, 1).astype(np.int32),
           "txt_mask": np.ones((rows, length), bool),
           "img_feat": np.repeat(np.arange(rows, dtype=np.float32)[:, None, None],
                                 regions_per_image, 1),
           "img_pos": np.zeros((rows, regions_per_image, 7), np.float32),
           "img_mask": np.ones((rows, regions_per_image), bool),
           "image_id": image_id, "example_mask": real,
           "itm_target": np.ones(rows, np.int32)}
  model = RecordingModel(text, regions)
  itm.itm_loss(model, batch, None, wra_weight=0.0, negatives="hardest")

  # Expected, from the formula: cosine of mean states, other image ids, real rows.
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  scores = unit(regions.mean(1)) @ unit(text.mean(1)).T  # [image, caption]
  other = (image_id[:, None] != image_id[None, :]) & real[:, None] & real[None, :]
  closest_image_to_caption0 = int(np.argmax(np.where(other[:, 0], scores[:, 0], -9)))
  closest_caption_to_image1 = int(np.argmax(np.where(other[1], scores[1], -9)))
  assert closest_image_to_caption0 != 3
  # Rows 0-2 stay matched; row 3 = caption 0 + hard image (anchor 0 is even), row 4
  # = hard caption + image 1 (anchor 1 is odd); row 5 (padding) stays as it was.
  seen = model.seen
  np.testing.assert_array_equal(seen["input_ids"][:, 0],
                                [0, 1, 2, 0, closest_caption_to_image1, 5])
  np.testing.assert_array_equal(seen["img_feat"][:, 0, 0],
                                [0, 1, 2, closest_image_to_caption0, 1, 5])
  np.testing.assert_array_equal(seen["itm_target"], [1, 1, 1, 0, 0, 1])
  with pytest.raises(ValueError, match="needs `image_id`"):
    itm.itm_loss(model, {k: v for k, v in batch.items() if k != "image_id"}, None,
                 wra_weight=0.0, negatives="hardest")
