"""Optimizer schedule and decay mask, task mixing, mesh and rule validation."""

import collections

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from vlp.parallel import logical, mesh as mesh_lib, sharding as sharding_lib
from vlp.train import optim
from vlp.train.task_mix import TaskMix, loss_weights, weighted


def test_schedule_matches_reference_formula():
  peak, warmup, total = 5e-5, 10, 50
  sched = optim.warmup_linear_decay(peak, warmup, total)
  for step in [0, 4, 8, 9, 10, 30, 48, 49, 60]:
    t = step + 1
    want = peak * t / warmup if t < warmup else peak * max(0, (total - t) / (total - warmup))
    want = want if want > 0 else 1e-8
    assert float(sched(step)) == pytest.approx(want, rel=1e-6), step


def test_decay_mask_follows_reference_names():
  params = {"uniter": {"embeddings": {"LayerNorm": {"scale": 1, "bias": 1},
                                      "word_embeddings": {"embedding": 1}},
                       "img_embeddings": {"img_layer_norm": {"scale": 1, "bias": 1},
                                          "img_linear": {"kernel": 1, "bias": 1}}}}
  m = optim.decay_mask(params)
  assert m["uniter"]["embeddings"]["LayerNorm"] == {"scale": False, "bias": False}
  assert m["uniter"]["embeddings"]["word_embeddings"]["embedding"] is True
  # The reference's name test leaves img_layer_norm.weight decayed.
  assert m["uniter"]["img_embeddings"]["img_layer_norm"] == {"scale": True, "bias": False}
  assert m["uniter"]["img_embeddings"]["img_linear"] == {"kernel": True, "bias": False}


def _opt_cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(
      learning_rate=0.1, warmup_steps=1, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01,
      grad_clip=1.0, clip_scale=1.0, frozen=""), **kw))


def test_clip_scale_clips_the_reference_sum_and_feeds_it_to_adamw():
  # The mean gradient g (norm 0.05) times the reference's GPUs x accumulation steps.
  params = {"w": jnp.zeros((2,))}
  g = {"w": jnp.array([0.03, 0.04])}
  def first_step(scale, grads=g):
    tx, _ = optim.make_optimizer(_opt_cfg(clip_scale=scale, weight_decay=0.0), 10)
    updates, state = tx.update(grads, tx.init(params), params)
    return np.asarray(optax_mu(state)["w"]), np.asarray(updates["w"])
  # Scale 1: 0.05 < clip 1, nothing clipped; mu = (1 - b1) g.
  np.testing.assert_allclose(first_step(1.0)[0], [0.003, 0.004], rtol=1e-6)
  # Scale 10: 10 g has norm 0.5 < 1, not clipped, and AdamW sees 10 g.
  np.testing.assert_allclose(first_step(10.0)[0], [0.03, 0.04], rtol=1e-6)
  # Scale 48 (8 GPUs x 6 steps): 48 g = [1.44, 1.92], norm 2.4 > 1: clipped to [0.6, 0.8].
  mu, update = first_step(48.0)
  np.testing.assert_allclose(mu, [0.06, 0.08], rtol=1e-6)
  # First AdamW step: -lr m_hat / (sqrt(v_hat) + eps) with m_hat = c, v_hat = c^2.
  np.testing.assert_allclose(update, -0.1 * np.array([0.6, 0.8]) / (np.array([0.6, 0.8]) + 1e-6),
                             rtol=1e-5)
  # Adam's eps sits next to the scaled gradient, as in the reference: a tiny mean
  # gradient 3e-7 moves by 3e-7 / (3e-7 + 1e-6) at scale 1, 48 * 3e-7 / (48 * 3e-7 + 1e-6)
  # at scale 48 (a threshold scaled down instead would leave the first).
  tiny = {"w": jnp.array([3e-7, 0.0])}
  for scale in (1.0, 48.0):
    want = -0.1 * scale * 3e-7 / (scale * 3e-7 + 1e-6)
    np.testing.assert_allclose(first_step(scale, tiny)[1][0], want, rtol=1e-3)
  with pytest.raises(ValueError, match="optimizer.clip_scale must be positive"):
    optim.make_optimizer(_opt_cfg(clip_scale=0.0), 10)


def test_frozen_modules_take_no_update_and_leave_the_clip_norm():
  assert optim.frozen_modules(_opt_cfg(frozen=" uniter , itm_output ")) == (
      "uniter", "itm_output")
  assert optim.frozen_modules(_opt_cfg()) == ()
  params = {"uniter": {"w": jnp.ones((3,))}, "dual_output": {"kernel": jnp.ones((2,))}}
  grads = {"uniter": {"w": jnp.full((3,), 100.0)},
           "dual_output": {"kernel": jnp.array([3.0, 4.0])}}
  tx, _ = optim.make_optimizer(_opt_cfg(frozen="uniter"), 10)
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["uniter"]["w"], 0.0)  # Weight decay included.
  # The frozen module holds no optimizer state: only the head's moments are allocated.
  mu = optax_mu(state)
  assert isinstance(mu["uniter"]["w"], optax.MaskedNode)
  assert sorted(x.size for x in jax.tree.leaves(state)) == [1, 1, 2, 2]  # 2 counts, mu, nu.
  # Clipped on the head's own norm 5: g = [0.6, 0.8], mu = (1 - b1) g.
  np.testing.assert_allclose(mu["dual_output"]["kernel"], [0.06, 0.08], rtol=1e-6)
  # First AdamW step: -lr (g / |g| + wd p) per entry (bias correction cancels).
  np.testing.assert_allclose(updates["dual_output"]["kernel"], -0.1 * (1 + 0.01), rtol=1e-4)
  # Unfrozen, the same gradients clip on the global norm sqrt(3 * 100^2 + 25).
  tx_all, _ = optim.make_optimizer(_opt_cfg(), 10)
  _, state_all = tx_all.update(grads, tx_all.init(params), params)
  np.testing.assert_allclose(optax_mu(state_all)["dual_output"]["kernel"],
                             0.1 * np.array([3.0, 4.0]) / np.sqrt(30025.0), rtol=1e-5)
  bad, _ = optim.make_optimizer(_opt_cfg(frozen="uniter,backbone"), 10)
  with pytest.raises(ValueError, match=r"frozen names \['backbone'\].*dual_output"):
    bad.init(params)


def test_lr_multipliers_scale_one_module_after_adamw():
  # The VQA head's 10x (config.head_lr_mult): the head's update, weight decay
  # included, is exactly 10 times the plain AdamW update; other modules unchanged.
  params = {"uniter": {"w": jnp.full((2,), 2.0)}, "vqa_output": {"kernel": jnp.full((2,), 3.0)}}
  grads = {"uniter": {"w": jnp.array([0.3, -0.4])},
           "vqa_output": {"kernel": jnp.array([-0.6, 0.8])}}
  cfg = _opt_cfg(grad_clip=100.0)
  plain, _ = optim.make_optimizer(cfg, 10)
  scaled, _ = optim.make_optimizer(cfg, 10, lr_multipliers={"vqa_output": 10.0})
  want, _ = plain.update(grads, plain.init(params), params)
  got, _ = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_allclose(got["uniter"]["w"], want["uniter"]["w"], rtol=1e-6)
  np.testing.assert_allclose(got["vqa_output"]["kernel"], 10.0 * want["vqa_output"]["kernel"],
                             rtol=1e-6)
  # First step: -lr (sign(g) + wd p), lr = 0.1 after the 1-step warm-up.
  np.testing.assert_allclose(want["vqa_output"]["kernel"],
                             -0.1 * (np.sign([-0.6, 0.8]) + 0.01 * 3.0), rtol=1e-4)


def optax_mu(state):
  return optax.tree_utils.tree_get(state, "mu")


def test_task_mix_is_deterministic_and_follows_ratios():
  ratios = {"mlm": 4, "mrfr": 2, "itm": 2}
  a, b = TaskMix(ratios, seed=3), TaskMix(ratios, seed=3)
  seq = [a.task(s) for s in range(4000)]
  assert seq == [b.task(s) for s in range(4000)]
  assert seq != [TaskMix(ratios, seed=4).task(s) for s in range(4000)]
  counts = collections.Counter(seq)
  for name, r in ratios.items():
    p = r / 8
    sd = np.sqrt(p * (1 - p) / 4000)
    assert abs(counts[name] / 4000 - p) < 5 * sd, (name, counts)
  # Order-independent: step 123 gives the same task whatever was asked before.
  assert TaskMix(ratios, 3).task(123) == seq[123]


def test_loss_weights_scale_the_loss_and_gradient_but_not_the_metrics():
  def loss_fn(w, batch, rng):
    loss = (w * batch).sum() ** 2
    return loss, {"loss/t": loss}
  x, w = np.array([1.0, 2.0]), np.array([0.5, -1.0])
  (l1, m1), g1 = jax.value_and_grad(loss_fn, has_aux=True)(w, x, None)
  (l3, m3), g3 = jax.value_and_grad(weighted(loss_fn, 3.0), has_aux=True)(w, x, None)
  assert float(l1) == 2.25 and float(l3) == 6.75  # (0.5 - 2)^2 = 2.25, times 3
  np.testing.assert_allclose(g3, 3 * np.asarray(g1))  # d/dw = 2 (w.x) x = [-3, -6]
  np.testing.assert_allclose(g1, [-3.0, -6.0])
  assert float(m3["loss/t"]) == 2.25
  assert weighted(loss_fn, 1.0) is loss_fn
  cfg = {"loss_weights": {"itm": 20.0}}
  assert loss_weights(cfg, ["mlm", "itm"], ["mlm", "itm", "mrc"]) == {"mlm": 1.0, "itm": 20.0}
  with pytest.raises(ValueError, match=r"unknown task\(s\) \['itn'\]"):
    loss_weights({"loss_weights": {"itn": 2.0}}, ["itm"], ["itm"])
  with pytest.raises(ValueError, match="must be positive"):
    loss_weights({"loss_weights": {"itm": 0.0}}, ["itm"], ["itm"])


def test_mesh_resolves_and_rejects_bad_sizes():
  assert jax.device_count() == 8
  m = mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match=r"does not divide the 8 devices.*multiply to 3"):
    mesh_lib.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})
  with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
    mesh_lib.make_mesh({"data": 3, "fsdp": 2, "tensor": 1})
  with pytest.raises(ValueError, match="unknown axes"):
    mesh_lib.make_mesh({"data": -1, "model": 2})


def test_rules_validation_and_specs():
  m = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with pytest.raises(ValueError, match="names mesh axis 'nope'"):
    sharding_lib.rules_for([("embed", "nope")], m)
  with pytest.raises(ValueError, match="not a preset"):
    sharding_lib.rules_for("zero3", m)
  rules = sharding_lib.rules_for("fsdp_tp", m)
  assert logical.logical_to_spec(("embed", "mlp"), rules, m) == P("fsdp", "tensor")
  assert logical.logical_to_spec(("batch", "length"), rules, m) == P(("data", "fsdp"), None)
  dp = sharding_lib.rules_for("dp", m)
  assert logical.logical_to_spec(("embed", "mlp"), dp, m) == P(None, None)
