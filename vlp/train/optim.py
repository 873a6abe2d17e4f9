"""Optimizer from config: AdamW, UNITER's warm-up/decay schedule and decay mask.

As the UNITER reference (`optim/adamw.py`, `optim/sched.py`, `optim/misc.py`;
docs/reference.md, "Optimizer and schedule"): AdamW (0.9, 0.98), eps 1e-6, weight decay
0.01 on every parameter except those whose reference name contains ``bias``,
``LayerNorm.weight`` or ``LayerNorm.bias``; global-norm clipping; linear warm-up
to the peak then linear decay to 0 at ``total_steps`` (non-positive -> 1e-8).

Known, documented differences from the reference HF-style AdamW: optax applies
decay as ``p -= lr * (update + wd * p)`` (the reference decays the already-updated
parameter, a second-order difference in lr), and folds eps inside the bias
correction.

Gradient scale (`clip_scale`): vlp's gradient is the mean over the global batch
(and over micro-batches with `grad_accum`). The reference sums its per-GPU,
per-micro-batch gradients over GPUs and accumulation steps before clipping; where
each micro-batch loss is a mean, its gradient is (GPUs x accumulation steps)
times vlp's mean and its clip bites on that larger norm (base pretraining:
8 GPUs x 6 steps = 48; clip 5.0 fires once the mean gradient's norm exceeds
5/48 ~ 0.1). `optimizer.clip_scale` multiplies the gradient by that factor
before clipping, and AdamW gets the multiplied gradient, as in the reference
(each config derives its factor). Scaling the threshold down instead would clip
the same steps to the same direction, but Adam's eps (1e-6) would then sit next
to a gradient `clip_scale` times smaller than the reference's; scaling the
gradient keeps eps in the reference's proportion too. Otherwise Adam is
invariant to the scale: it changes which steps clip, and the weight of eps.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax


def warmup_linear_decay(peak: float, warmup: int, total: int) -> optax.Schedule:
  """lr(t) for update t = step + 1, exactly the reference formula."""
  warmup = max(int(warmup), 1)
  total = max(int(total), warmup + 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32) + 1.0
    up = peak * t / warmup
    down = peak * jnp.maximum(0.0, (total - t) / (total - warmup))
    lr = jnp.where(t < warmup, up, down)
    return jnp.where(lr > 0, lr, 1e-8)
  return schedule


def decay_mask(params: Any) -> Any:
  """True where weight decay applies, following the reference's name rule.

  Our tree mirrors the torch names, so ``bias`` leaves and the parameters of
  modules called ``LayerNorm`` are excluded; ``img_layer_norm`` and the heads'
  LayerNorms (other names in torch) stay decayed, as in the reference.
  """
  def rule(path, _):
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return not (keys[-1] == "bias" or "LayerNorm" in keys[:-1])
  return jax.tree_util.tree_map_with_path(rule, params)


def _top(path) -> str:
  """The top-level module name of a parameter path."""
  return str(getattr(path[0], "key", path[0]))


def scale_by_module(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates of top-level modules, e.g. {'vqa_output': 10.0}.

  Applied after AdamW, so it scales the head's learning rate including its weight
  decay, like the reference's per-group `lr_mul`. Stateless.
  """
  multipliers = {k: float(v) for k, v in dict(multipliers).items()}

  def update(updates, state, params=None):
    del params
    def scale(path, u):
      m = multipliers.get(_top(path))
      return u if m is None else u * m
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def frozen_modules(opt_cfg) -> tuple[str, ...]:
  """Top-level module names in `opt_cfg.frozen` ("uniter,itm_output"; "" = none)."""
  raw = opt_cfg.frozen or ""
  return tuple(name.strip() for name in str(raw).split(",") if name.strip())


def _check_frozen(params, frozen: tuple[str, ...]) -> None:
  unknown = sorted(set(frozen) - {str(k) for k in params})
  if unknown:
    raise ValueError(f"optimizer.frozen names {unknown}, which are not top-level modules "
                     f"of this model; expected some of {sorted(map(str, params))}")


def frozen_labels(frozen: tuple[str, ...]):
  """`params -> tree of "frozen" | "trained"` by top-level module, for multi_transform.

  Checks the names against the tree it is given (params at `init`, updates at
  `update`). `optax.tree_map_params` calls `init` on one placeholder leaf instead
  of a tree: that leaf stands for every parameter and is labelled "trained".
  """
  def labels(params):
    if not isinstance(params, Mapping):
      return "trained"
    _check_frozen(params, frozen)
    return {k: jax.tree.map(lambda _: "frozen" if str(k) in frozen else "trained", v)
            for k, v in params.items()}
  return labels


def make_optimizer(opt_cfg, total_steps: int, *,
                   lr_multipliers: Mapping[str, float] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW per `opt_cfg`; `lr_multipliers` scales top-level modules' learning rates.

  `opt_cfg.frozen` names top-level modules ("" = none) that are not trained (ALADIN's
  frozen backbone). They get no update (weight decay included), do not count in the
  clipping norm, and hold no optimizer state: AdamW runs inside
  `optax.multi_transform` on the trained modules only, so a frozen backbone costs
  no Adam moments in memory or in checkpoints (their places in the state are
  `optax.MaskedNode`s).

  `opt_cfg.clip_scale` multiplies the gradient before clipping and AdamW (module
  docstring): the clip then fires when `clip_scale * |mean gradient| > grad_clip`.
  """
  schedule = warmup_linear_decay(opt_cfg.learning_rate, opt_cfg.warmup_steps, total_steps)
  if not opt_cfg.clip_scale > 0:
    raise ValueError(f"optimizer.clip_scale must be positive (1 = clip the mean gradient; "
                     f"the reference's GPUs x accumulation steps to clip as it does), "
                     f"got {opt_cfg.clip_scale!r}")
  scale = [optax.scale(float(opt_cfg.clip_scale))] if opt_cfg.clip_scale != 1 else []
  parts = scale + [optax.clip_by_global_norm(opt_cfg.grad_clip),
           optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                       weight_decay=opt_cfg.weight_decay, mask=decay_mask)]
  if lr_multipliers:
    parts.append(scale_by_module(lr_multipliers))
  tx = optax.chain(*parts)
  frozen = frozen_modules(opt_cfg)
  if frozen:
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                               frozen_labels(frozen))
  return tx, schedule
