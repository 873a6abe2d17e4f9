"""The matching model's parts against numpy or hand computations: the encoders, COOKIE's shared block, COMMA's cross step,
SLAN's filter, HGAN's levels and LOUPE's Shapley estimates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlp.matching import blocks, graph, losses, shapley, similarities, similarity_hierarchical
from vlp.matching.encoders import BiGruTextEncoder
from vlp.matching.model import MatchingModel, MatchingSpec
from vlp.models.uniter_config import model_config

CFG = model_config("tiny", vocab_size=30, hidden_size=16, num_layers=1, num_heads=2,
                   intermediate_size=32, img_dim=8, hidden_dropout=0.0, attention_dropout=0.0)
RNG = np.random.default_rng(0)


def toy(bi=3, bt=4, r=5, l=6, d=16):
  regions = RNG.normal(size=(bi, r, d)).astype(np.float32)
  tokens = RNG.normal(size=(bt, l, d)).astype(np.float32)
  rmask = np.ones((bi, r), bool)
  rmask[0, 3:] = False
  tmask = np.ones((bt, l), bool)
  tmask[1, 2:] = False
  return regions, rmask, tokens, tmask


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_bigru_skips_padding_and_reads_both_directions():
  enc = BiGruTextEncoder(CFG, rngs=nnx.Rngs(0))
  ids = np.array([[3, 4, 5, 0, 0], [3, 4, 5, 7, 8]])
  mask = ids > 0
  out = np.asarray(enc(ids, mask))
  assert out.shape == (2, 5, 16)
  np.testing.assert_array_equal(out[0, 3:], 0)
  # Padding changes nothing: the first row alone, without its pad.
  short = np.asarray(enc(ids[:1, :3], mask[:1, :3]))
  np.testing.assert_allclose(out[0, :3], short[0], atol=1e-5)
  # The backward direction sees later words: word 0 differs between the rows.
  assert np.abs(out[0, 0] - out[1, 0]).max() > 0.05 * np.abs(out[0, 0]).max()


def batch(b=2, k=5, t=6):
  return {"input_ids": RNG.integers(1, 30, (b, t)), "txt_mask": np.ones((b, t), bool),
          "img_feat": RNG.normal(size=(b, k, 8)).astype(np.float32),
          "img_pos": RNG.uniform(size=(b, k, 7)).astype(np.float32),
          "img_mask": np.ones((b, k), bool)}


def test_cookie_shared_block_is_one_set_of_weights_for_both_streams():
  from vlp.models.uniter import BertLayer
  model = MatchingModel(CFG, MatchingSpec(shared_layers=1), rngs=nnx.Rngs(0))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
  one_layer = len(jax.tree_util.tree_leaves(nnx.state(BertLayer(CFG, rngs=nnx.Rngs(0)),
                                                      nnx.Param)))
  assert sum("shared_top" in p for p in paths) == one_layer  # one copy, not one per stream
  # Its last LayerNorm's bias ends both streams: +0.5 there moves both by exactly 0.5.
  b = batch()
  img0, _ = model.encode_image(b)
  txt0, _ = model.encode_text(b)
  bias = model.shared_top[0].output.LayerNorm.bias
  bias[...] = bias[...] + 0.5
  img1, _ = model.encode_image(b)
  txt1, _ = model.encode_text(b)
  np.testing.assert_allclose(np.asarray(img1 - img0), 0.5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(txt1 - txt0), 0.5, atol=1e-5)
  assert not list(MatchingModel(CFG, MatchingSpec(), rngs=nnx.Rngs(0)).shared_top)


def test_comma_cross_step_matches_numpy_and_pairs_are_independent():
  x = RNG.normal(size=(1, 3, 4)).astype(np.float32)
  y = RNG.normal(size=(1, 5, 4)).astype(np.float32)
  ym = np.array([[1, 1, 1, 0, 0]], bool)
  logits = x[0] @ y[0, :3].T / 2.0
  a = np.exp(logits - logits.max(1, keepdims=True))
  a /= a.sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(blocks.cross_attend(x, y, ym))[0], x[0] + a @ y[0, :3],
                             atol=1e-5)
  block = blocks.AlternatingCrossAttention(CFG, 2, rngs=nnx.Rngs(1))
  r, rm, t, tm = toy()
  s = np.asarray(block(r, rm, t, tm))
  assert s.shape == (3, 4)
  # A pair's score is that pair's alone (all-pairs batching mixes nothing).
  np.testing.assert_allclose(s[2, 1], np.asarray(block(r[2:3], rm[2:3], t[1:2], tm[1:2]))[0, 0],
                             atol=1e-5)
  # Padded words change nothing.
  t2 = t.copy()
  t2[1, 2:] = 99.0
  np.testing.assert_allclose(np.asarray(block(r, rm, t2, tm)), s, atol=1e-5)


def test_slan_filter_keeps_the_top_k_regions():
  f = blocks.TextConditionedRegionFilter(CFG, 1, rngs=nnx.Rngs(2))
  r, rm, t, tm = toy()
  s = np.asarray(f(r, rm, t, tm))
  rel = np.asarray(f.relevance(r, rm, t, tm))
  for i in range(3):
    for j in range(4):
      best = r[i, int(np.argmax(rel[i, j]))]
      txt = unit(t[j][tm[j]].mean(0))
      np.testing.assert_allclose(s[i, j], unit(best) @ txt, atol=1e-5)
  assert not rel[0, :, 3:].max() > -1e8  # padded regions are never kept
  keep = np.asarray(blocks.TextConditionedRegionFilter(CFG, 2, rngs=nnx.Rngs(2)).keep_mask(rel))
  assert (keep.sum(-1) == 2).all()


def test_hgan_global_level_and_graph():
  r, rm, t, tm = toy()
  glob = np.asarray(similarity_hierarchical.hgan_3level(r, rm, t, tm, weights=(0, 0, 1)))
  np.testing.assert_allclose(glob, np.asarray(similarities.cosine_global(r, rm, t, tm)), atol=1e-5)
  # The levels against a numpy loop: tests/test_matching_similarities.py.
  # Graph reasoning: permuting the nodes permutes the output; padding sends nothing.
  g = graph.GraphReasoning(CFG, 2, rngs=nnx.Rngs(3))
  out = np.asarray(g(r, rm))
  perm = np.array([2, 0, 1, 3, 4])
  np.testing.assert_allclose(np.asarray(g(r[:, perm], rm[:, perm])), out[:, perm], atol=1e-5)
  r2 = r.copy()
  r2[0, 3:] = 50.0
  np.testing.assert_allclose(np.asarray(g(r2, rm))[0, :3], out[0, :3], atol=1e-5)


def glove_like(s):
  """4 players: 0 and 1 are worth 1 together, 2 adds 0.5 alone, 3 is null."""
  return (1.0 if {0, 1} <= s else 0.0) + (0.5 if 2 in s else 0.0) + 0.0


def test_exact_shapley_and_interaction_by_hand():
  np.testing.assert_allclose(shapley.exact_shapley(glove_like, 4), [0.5, 0.5, 0.5, 0.0])
  # {0, 1} together carry what neither has alone: I = 1 - (0.5 + 0.5) = 0 ... as one
  # player [S] is worth 1, so I([S]) = 1 - 1 = 0; a complementary pair with a third
  # player needed shows a positive interaction.
  assert shapley.shapley_interaction(glove_like, 4, [0, 1]) == pytest.approx(0.0)
  triple = lambda s: 1.0 if {0, 1, 2} <= s else 0.0
  assert shapley.exact_shapley(triple, 3) == pytest.approx([1 / 3] * 3)
  assert shapley.shapley_interaction(triple, 3, [0, 1]) == pytest.approx(0.5 - 2 / 3)
  additive = lambda s: sum([0.3, 0.2, 0.1][i] for i in s)
  assert shapley.shapley_interaction(additive, 3, [0, 2]) == pytest.approx(0.0)


def test_monte_carlo_shapley_converges_to_exact_on_a_toy_game():
  w = np.array([0.4, -0.2, 0.7, 0.1])
  value = lambda s: float(np.tanh(sum(w[i] for i in s)) + (0.3 if {1, 3} <= s else 0.0))
  exact = shapley.exact_shapley(value, 4)

  def values_of_masks(masks):
    lin = jnp.tanh(masks.astype(jnp.float32) @ jnp.asarray(w, jnp.float32))
    return lin + 0.3 * (masks[:, 1] & masks[:, 3])
  est = np.asarray(shapley.monte_carlo_shapley(values_of_masks, 4, jax.random.PRNGKey(0), 4000))
  np.testing.assert_allclose(est, exact, atol=0.02)
  # Efficiency holds for every single permutation: sum phi = v(all) - v(empty).
  one = np.asarray(shapley.monte_carlo_shapley(values_of_masks, 4, jax.random.PRNGKey(1), 1))
  assert one.sum() == pytest.approx(value(frozenset(range(4))) - value(frozenset()), abs=1e-5)


def test_shapley_alignment_loss_is_zero_when_alignment_matches_and_ignores_padding():
  r, rm, t, tm = toy(bi=3, bt=3)
  loss = float(shapley.shapley_alignment_loss(r, rm, t, tm, jax.random.PRNGKey(0),
                                              num_permutations=8))
  assert np.isfinite(loss) and loss >= 0
  r2 = r.copy()
  r2[0, 3:] = 77.0  # padded regions: null players
  loss2 = float(shapley.shapley_alignment_loss(r2, rm, t, tm, jax.random.PRNGKey(0),
                                               num_permutations=8))
  assert loss2 == pytest.approx(loss, rel=1e-5)


def test_uniter_streams_each_see_one_modality():
  model = MatchingModel(CFG, MatchingSpec(encoder="uniter"), rngs=nnx.Rngs(0))
  b = batch()
  other = dict(b, img_feat=b["img_feat"] + 1.0, input_ids=(b["input_ids"] % 29) + 1)
  other["input_ids"][:, 0] = b["input_ids"][:, 0]  # image-only keeps the first ([CLS]) id
  txt, _ = model.encode_text(b)
  img, _ = model.encode_image(b)
  # Text states ignore the regions; image states ignore every word after the first.
  np.testing.assert_array_equal(np.asarray(model.encode_text(dict(b, img_feat=other["img_feat"]))[0]),
                                np.asarray(txt))
  np.testing.assert_array_equal(
      np.asarray(model.encode_image(dict(b, input_ids=other["input_ids"]))[0]), np.asarray(img))
  assert img.shape == (2, 5, 16) and txt.shape == (2, 6, 16)
  assert np.abs(np.asarray(model.encode_image(other)[0] - img)).max() > 1e-3


def test_matching_objective_is_the_named_loss_on_the_batch_matrix():
  from vlp.matching.objective import make_matching_loss
  model = MatchingModel(CFG, MatchingSpec(), rngs=nnx.Rngs(0))
  b = dict(batch(b=4), image_id=np.array([7, 7, 8, 9]),
           example_mask=np.array([True, True, True, False]))
  loss, metrics = make_matching_loss(loss="info_nce", loss_args="temperature=0.1")(model, b, None)
  r, rm = model.encode_image(b)
  t, tm = model.encode_text(b)
  s = np.array(similarities.cosine_global(r, rm, t, tm))
  pos = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
  want = float(losses.info_nce(s, pos, temperature=0.1, image_mask=np.arange(4) < 3,
                               text_mask=np.arange(4) < 3))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(metrics["loss/matching"]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("spec", [
    MatchingSpec(text_encoder="bigru", shared_layers=1, graph_layers=1),
    MatchingSpec(scorer="comma"), MatchingSpec(scorer="slan"), MatchingSpec(encoder="uniter")])
def test_every_parameter_carries_logical_axis_names(spec):
  model = MatchingModel(CFG, spec, rngs=nnx.Rngs(0))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, (path, names)


class FixedScores:
  """A stand-in model whose score matrix is given: the objective's loss by hand."""

  def __init__(self, scores):
    self.matrix = jnp.asarray(scores, jnp.float32)

  def encode_image(self, batch, rngs=None):
    return jnp.zeros((3, 1, 1)), jnp.ones((3, 1), bool)

  def encode_text(self, batch, rngs=None):
    return jnp.zeros((3, 1, 1)), jnp.ones((3, 1), bool)

  def scores(self, regions, region_mask, tokens, token_mask, rngs=None):
    return self.matrix


def test_mean_warmup_is_hinge_sum_before_its_last_step_and_hinge_hardest_after():
  from vlp.matching.objective import STEP_KEY, make_matching_loss
  model = FixedScores([[0.9, 0.5, 0.8],
                       [0.6, 0.7, 0.3],
                       [0.2, 0.6, 0.4]])
  # Margin 0.2, diagonal positives. Images (rows): anchor 0.9 -> [0, 0.1];
  # 0.7 -> [0.1, 0]; 0.4 -> [0, 0.4]. Captions (columns): 0.9 -> [0, 0];
  # 0.7 -> [0, 0.1]; 0.4 -> [0.6, 0.1]. Mean over the 3 anchors per direction.
  summed = (0.1 + 0.1 + 0.4) / 3 + (0.0 + 0.1 + 0.7) / 3
  hardest = (0.1 + 0.1 + 0.4) / 3 + (0.0 + 0.1 + 0.6) / 3
  fn = make_matching_loss(loss="hinge_hardest", loss_args="margin=0.2", mean_warmup_steps=2)
  loss_at = jax.jit(lambda step: fn(model, {"input_ids": jnp.zeros((3, 2), jnp.int32),
                                            STEP_KEY: jnp.full((3,), step, jnp.int32)},
                                    None)[0])
  for step, want in [(0, summed), (1, summed), (2, hardest), (7, hardest)]:
    assert float(loss_at(step)) == pytest.approx(want, abs=1e-6), step
  plain = make_matching_loss(loss="hinge_hardest", loss_args="margin=0.2")
  assert float(plain(model, {"input_ids": np.zeros((3, 2))}, None)[0]) == pytest.approx(
      hardest, abs=1e-6)
  with pytest.raises(ValueError, match="train_step"):
    fn(model, {"input_ids": np.zeros((3, 2))}, None)
  with pytest.raises(ValueError, match="mean_warmup_steps=5 warms up 'hinge_hardest'"):
    make_matching_loss(loss="info_nce", mean_warmup_steps=5)


def test_step_stamped_stream_stamps_each_batch_with_its_index_and_resumes():
  from vlp.data.streams import StepStamped

  class Stream:  # The TrainIterator surface StepStamped reads.
    def __init__(self):
      self.next_index = 3

    def get_state(self):
      return {"next_index": self.next_index}

    def set_state(self, state):
      self.next_index = state["next_index"]

    def __next__(self):
      self.next_index += 1
      return {"input_ids": np.zeros((2, 4), np.int32)}

  stream = StepStamped(Stream(), "train_step")
  assert next(stream)["train_step"].tolist() == [3, 3]
  assert next(stream)["train_step"].tolist() == [4, 4]
  stream.set_state({"next_index": 10})
  assert stream.get_state() == {"next_index": 10}
  assert next(stream)["train_step"].dtype == np.int32
