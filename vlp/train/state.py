"""Train state and its sharded creation from abstract shapes.

The model is an NNX module, but the state that crosses `jax.jit`, optax and orbax
is plain data: ``params`` is the pure nested dict of the model's `nnx.Param`
values, and the module structure (the `GraphDef`) is kept aside and merged back
inside the jitted functions. Everything is created *already sharded*: shapes come
from `nnx.eval_shape`, shardings from the parameters' logical names, and one
`jax.jit(init, out_shardings=...)` materialises each shard on its own device.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlp.parallel import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer updates done so far.
  params: Any            # Pure nested dict of parameter arrays.
  opt_state: Any
  rng: jax.Array         # uint32 key data; folded with `step` for each update.


def split_abstract(make_model: Callable[[nnx.Rngs], nnx.Module]):
  """(graphdef, abstract nnx.State of Params) without allocating anything."""
  abstract = nnx.eval_shape(lambda: make_model(rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"model holds non-parameter state {rest}; vlp models must be stateless")
  return graphdef, params


def state_shardings(make_model, tx: optax.GradientTransformation, *, mesh: Mesh, rules,
                    sharding_name: Any = "dp", strict: bool = False):
  """(graphdef, TrainState of NamedShardings), from abstract shapes only.

  Optimizer leaves that mirror a parameter (Adam's mu, nu) take its sharding
  (frozen modules have none: `optim.make_optimizer`); the others (optax's step
  `count`) are replicated over the whole mesh rather than left on one device, so
  the state can be fed back as `in_shardings`.
  """
  graphdef, abstract_params = split_abstract(make_model)
  p_sh = sharding_lib.param_shardings(abstract_params, mesh, rules, strict=strict)
  abstract_pure = nnx.to_pure_dict(abstract_params)
  sharding_lib.check_sufficiently_sharded(abstract_pure, p_sh, sharding_name, mesh, rules)
  replicated = NamedSharding(mesh, P())
  # A MaskedNode (a frozen module's place in a multi_transform state) holds nothing.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_sh = optax.tree_map_params(
      tx, lambda v, s: v if masked(v) else s, jax.eval_shape(tx.init, abstract_pure), p_sh,
      transform_non_params=lambda _: replicated, is_leaf=masked)
  return graphdef, TrainState(step=replicated, params=p_sh, opt_state=opt_sh, rng=replicated)


def create_train_state(make_model, tx: optax.GradientTransformation, *, seed: int,
                       mesh: Mesh, rules, sharding_name: Any = "dp", strict: bool = False):
  """Returns (graphdef, state, state_shardings), every leaf created sharded."""
  graphdef, state_sh = state_shardings(make_model, tx, mesh=mesh, rules=rules,
                                       sharding_name=sharding_name, strict=strict)

  def init(key):
    params_key, train_key = jax.random.split(key)
    model = make_model(rngs=nnx.Rngs(params=params_key))
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=jax.random.key_data(train_key))

  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(seed))
  return graphdef, state, state_sh


def abstract_state(shardings: TrainState, make_model, tx) -> TrainState:
  """ShapeDtypeStructs with the current shardings: the restore target."""
  _, abstract_params = split_abstract(make_model)
  pure = nnx.to_pure_dict(abstract_params)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=pure,
                      opt_state=jax.eval_shape(tx.init, pure),
                      rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)
