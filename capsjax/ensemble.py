"""K independent training runs ("members") as one jitted program over a leading member axis.

A small CapsNet leaves most of a modern accelerator idle, and every accuracy needs several
seeds; so K members train side by side in one program. Member m is the single run with its
own config: its own init and augmentation keys (from `config.seed`), its own data order
(`input_pipeline.epoch_batch_indices` with its seed) and, for the fields of
`PER_MEMBER_FIELDS`, its own hyperparameters. Every other field must be equal across
members (`check_packable`): it shapes the program they share.

The ensemble state is the single run's `nnx.State` with a leading [K] axis on every leaf, so
`member_state(state, m)` is an ordinary single-run state (checkpoints, evaluation, export)
and `stack_states` packs K of them. The graphdef is the single run's.

Per-member learning rates: the optimizer transform is static inside the graphdef, so each
step evaluates member m's own optax schedule on member m's count (K static schedules), and
the member's update is `optim.adam` with a schedule returning that value: the single run's
arithmetic. Loss weights that differ between members enter as traced [K] values.

How the members run (`resolve_vmap_size`): vectorised with `jax.vmap`, all at once, on
accelerators; one after another (`jax.lax.map` inside the program) on CPU, where each
member then runs its single run's program and matches it bit for bit. Vectorised
convolutions and matmuls sum in another order, so there members match to rounding.

`active` [K] freezes members (early-stopped, non-finite): their state passes through the
step unchanged while the others train. Data parallelism is the single run's: the batch axis
(axis 1, under the member axis) is split over the mesh's 'data' axis, the state replicated.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterator, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from capsjax import errors
from capsjax.data import input_pipeline
from capsjax import losses
from capsjax import optim
from capsjax import parallel
from capsjax.run import config as run_config
from capsjax import steps as steps_lib

# The `config.loss` fields that only scale or shift loss terms: traced [K] values.
LOSS_FIELDS = (
  "m_plus",
  "m_minus",
  "lam",
  "recon_weight",
  "class_weight",
  "spread_margin_start",
  "spread_margin_end",
)
# The config fields members may differ in. The optim fields only feed the learning-rate
# schedule, which is evaluated per member outside the vectorised step.
PER_MEMBER_FIELDS = (
  "seed",
  "optim.learning_rate",
  "optim.decay_rate",
  "optim.decay_epochs",
  "optim.decay_steps",
  "optim.staircase",
  "optim.min_learning_rate",
  *(f"loss.{f}" for f in LOSS_FIELDS),
)


# ----------------------------------------------------------------------------------------
# Configs and states.
# ----------------------------------------------------------------------------------------
def packable_fields() -> tuple[str, ...]:
  """The dotted config fields that may differ between members of one ensemble."""
  return PER_MEMBER_FIELDS


def _flat(config) -> dict:
  return json.loads(config.to_json_best_effort())


def check_packable(configs: Sequence[Any]) -> None:
  """Raises `errors.ConfigError` unless the configs can train as one ensemble.

  They must agree on every field but `packable_fields()`; the message names the first
  field (in sorted order) where a config differs from the first one.
  """
  if not configs:
    raise errors.ConfigError("an ensemble needs at least one member config, got none")
  first = _flat(configs[0])
  for m, config in enumerate(configs[1:], start=1):
    for field, a, b in run_config.changes(first, _flat(config)):
      if field not in PER_MEMBER_FIELDS:
        raise errors.ConfigError(
          f"config.{field} differs between ensemble members ({a!r} for member 0, {b!r} for "
          f"member {m}); only {', '.join(PER_MEMBER_FIELDS)} may differ"
        )


def stack_states(states: Sequence[nnx.State]) -> nnx.State:
  """K single-run states -> one state whose leaves have a leading [K] axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def member_state(state: nnx.State, m: int) -> nnx.State:
  """Member m's single-run state: every leaf [K, ...] -> [...]."""
  return jax.tree.map(lambda x: x[m], state)


def num_members(state: nnx.State) -> int:
  """K, the length of the leading axis of the state's leaves."""
  return int(jax.tree.leaves(state)[0].shape[0])


def init_members(configs, info: input_pipeline.DatasetInfo, steps_per_epoch: int):
  """(graphdef, state [K], aug_keys [K]): each member initialised as `train.setup` would.

  Member m's init and augmentation keys are split from `jax.random.key(configs[m].seed)`.
  """
  check_packable(configs)
  graphdef, states, aug_keys = None, [], []
  for config in configs:
    init_key, aug_key = jax.random.split(jax.random.key(config.seed))
    graphdef_m, state = steps_lib.create_model_and_optimizer(
      config, info, steps_per_epoch, init_key
    )
    graphdef = graphdef if graphdef is not None else graphdef_m
    states.append(state)
    aug_keys.append(aug_key)
  return graphdef, stack_states(states), jnp.stack(aug_keys)


# ----------------------------------------------------------------------------------------
# Per-member hyperparameters and the member loop.
# ----------------------------------------------------------------------------------------
def resolve_vmap_size(vmap_size: int | None, num: int) -> int:
  """How many of `num` members one vectorised pass computes (`jax.lax.map`'s batch size).

  None picks the backend's best: all of them on accelerators, whose utilisation is the
  point of an ensemble; 1 on CPU, which one member already keeps busy, and where a loop
  over members runs each one's single-run program, bit for bit (vectorised convolutions
  and matmuls may sum in another order).
  """
  if vmap_size is None:
    return 1 if jax.default_backend() == "cpu" else num
  if isinstance(vmap_size, bool) or not isinstance(vmap_size, int) or vmap_size < 1:
    raise ValueError(f"vmap_size must be a positive int or None, got {vmap_size!r}")
  return min(vmap_size, num)


@dataclasses.dataclass(frozen=True, eq=False)
class Members:
  """What the members' steps close over: shared settings, per-member values, the loop.

  schedules: each member's learning-rate schedule (static; evaluated per member).
  weights: each member's `LossWeights` (Python floats: `evaluate`'s host-side loss).
  loss: {field: float32 [K]} for each of LOSS_FIELDS whose value differs between members:
    traced per member. Fields all members share stay Python floats, as in the single
    run's program (XLA folds such constants, so tracing them could change roundings).
  aug: the shared augmentation settings.
  vmap_size: members per vectorised pass (`resolve_vmap_size`).
  """

  schedules: tuple[optax.Schedule, ...]
  weights: tuple[losses.LossWeights, ...]
  loss: dict[str, np.ndarray]
  aug: steps_lib.AugmentSpec
  vmap_size: int
  optim: Any  # the shared `config.optim` (Adam's epsilon and its convention).
  steps_per_epoch: int  # the plateau schedule's epoch (`optim.reduce_on_plateau`).

  @classmethod
  def from_configs(cls, configs, steps_per_epoch: int, vmap_size: int | None = None) -> Members:
    """From the members' configs (`check_packable` first)."""
    check_packable(configs)
    # The single run's (weights, augmentation, schedule): the loops cannot drift apart.
    hyper = [steps_lib._hyperparameters(c, steps_per_epoch) for c in configs]  # pylint: disable=protected-access
    values = {f: [getattr(w, f) for w, _, _ in hyper] for f in LOSS_FIELDS}
    loss = {f: np.array(v, np.float32) for f, v in values.items() if len(set(v)) > 1}
    return cls(
      schedules=tuple(s for _, _, s in hyper),
      weights=tuple(w for w, _, _ in hyper),
      loss=loss,
      aug=hyper[0][1],
      vmap_size=resolve_vmap_size(vmap_size, len(configs)),
      optim=configs[0].optim,
      steps_per_epoch=int(steps_per_epoch),
    )

  @property
  def size(self) -> int:
    return len(self.schedules)

  def with_loss(self, loss: dict[str, jax.Array]) -> losses.LossWeights:
    """Inside the member loop: the shared `LossWeights` with one member's traced `loss`."""
    return dataclasses.replace(self.weights[0], **loss)

  def map(self, fn: Callable, *xs):
    """fn(*x) for the row x of every member of `xs` (leaves [K, ...]), stacked: [K, ...].

    `vmap_size` members at a time: a loop over members running `fn` itself (1), a
    `jax.vmap` of all of them (K), or a loop of vmaps.
    """
    if self.vmap_size == 1:
      return jax.lax.map(lambda x: fn(*x), xs)
    if self.vmap_size >= self.size:
      return jax.vmap(fn)(*xs)
    return jax.lax.map(lambda x: fn(*x), xs, batch_size=self.vmap_size)


def _keep_if_frozen(active: jax.Array, new, old):
  """`new` if the member is active (bool []), else `old`, leaf by leaf."""

  def pick(n, o):
    if jax.dtypes.issubdtype(o.dtype, jax.dtypes.prng_key):  # jnp.where takes no keys.
      data = jnp.where(active, jax.random.key_data(n), jax.random.key_data(o))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(o))
    return jnp.where(active, n, o)

  return jax.tree.map(pick, new, old)


def _member_train_step(graphdef, state, batch, key, active, step_size, logged_lr, loss, *, members):
  """One member's `steps.train_step`, its update scaled by the traced `step_size` []."""
  # nnx.merge adopts the state's Variables and the update writes into them: keep the arrays.
  old = jax.tree.map(lambda x: x, state)
  model, optimizer = nnx.merge(graphdef, state)
  # The single run's Adam is chain(direction, scale_by_learning_rate(schedule)): with a
  # schedule returning the member's own rate, the update is the single run's arithmetic.
  optimizer.tx = optim.adam(lambda count: step_size, members.optim, members.steps_per_epoch)
  member_graphdef, member = nnx.split((model, optimizer))
  new_state, aux = steps_lib.train_step(
    member_graphdef,
    member,
    batch,
    key,
    weights=members.with_loss(loss),
    aug=members.aug,
    schedule=lambda step: logged_lr,
  )
  # Selected per member inside the loop, where XLA can fuse the choice into the update.
  return _keep_if_frozen(active, new_state, old), aux


def train_step(graphdef, state, batch, keys, active, *, members: Members):
  """One step of every member: (state [K], batch, keys [K], active [K]) -> (state, aux).

  Args:
    state: the ensemble state, leaves [K, ...].
    batch: {'image': float32 [K, B, H, W, C], 'label': int32 [K, B]}, member m's batch at
      row m.
    keys: [K] the members' augmentation keys (as `steps.train_step`'s key).
    active: bool [K]; a frozen member's state comes back bit for bit unchanged.

  Returns:
    (state, aux): aux holds each metric of `steps.train_step` as float32 [K] (a frozen
    member's too, computed as if it had trained).
  """
  _, optimizer = nnx.merge(graphdef, state)
  # The single run evaluates its schedule on the optax chain's count (for the update) and
  # on the optimizer's step (for the log): the same here, per member, on scalars.
  counts, step = optimizer.opt_state[1].count[...], optimizer.step[...]  # [K], [K]
  step_size = jnp.stack([s(counts[m]) for m, s in enumerate(members.schedules)])  # [K]
  logged_lr = jnp.stack([s(step[m]) for m, s in enumerate(members.schedules)])  # [K]
  return members.map(
    lambda *args: _member_train_step(graphdef, *args, members=members),
    state,
    batch,
    keys,
    active,
    step_size,
    logged_lr,
    members.loss,
  )


def train_chunk(
  graphdef,
  state,
  data,
  indices,
  start,
  num_steps,
  keys,
  active,
  *,
  members: Members,
  max_steps: int,
  mesh,
):
  """Up to `max_steps` ensemble steps as one loop on the device, as `steps.train_chunk`.

  Args:
    data: {'image': uint8 [N, H, W, C], 'label': int32 [N]}, the one training set every
      member draws from (`parallel.put_dataset`).
    indices: int32 [K, S, B], member m's epoch batches at row m (`epoch_batch_indices`,
      placed by `parallel.put_member_batch_indices`).
    start, num_steps: int32 [], as for `steps.train_chunk` (members move in lockstep).
    keys, active: [K], as for `train_step`.

  Returns:
    (state, aux): aux holds each metric per step and member, float32 [max_steps, K];
    entries from num_steps on are 0.
  """

  def one_step(state, i):
    idx = jax.lax.dynamic_index_in_dim(indices, start + i, axis=1, keepdims=False)  # [K, B]
    batch = parallel.constrain_member_batch(
      input_pipeline.batch_at(data["image"], data["label"], idx), mesh
    )  # [K, B, H, W, C]
    return train_step(graphdef, state, batch, keys, active, members=members)

  return steps_lib.run_steps(one_step, state, num_steps, max_steps)


def eval_step(graphdef, state, batch, *, members: Members):
  """Every member's `steps.eval_step` sums on one shared batch: {name: float32 [K]}.

  batch: {'image' [B, H, W, C], 'label' [B], 'mask' [B]}, the same for every member (one
  copy on the devices, not K).
  """
  return members.map(
    lambda s, loss: steps_lib.eval_step(graphdef, s, batch, weights=members.with_loss(loss)),
    state,
    members.loss,
  )


def make_ensemble_steps(
  graphdef, configs, steps_per_epoch: int, mesh, *, vmap_size: int | None = None
):
  """Jitted (train_fn, eval_fn) of an ensemble, as `steps.make_steps` for one run.

  train_fn(state [K], batch {'image' [K,B,H,W,C], 'label' [K,B]}, keys [K], active [K])
  -> (state, aux {name: [K]}), the state donated; eval_fn(state [K], batch [B, ...]) ->
  sums {name: [K]}. Outputs are replicated over `mesh`. `configs`: one per member;
  `vmap_size`: see `resolve_vmap_size`.
  """
  members = Members.from_configs(configs, steps_per_epoch, vmap_size)
  train = parallel.jit_data_parallel(
    lambda state, batch, keys, active: train_step(
      graphdef, state, batch, keys, active, members=members
    ),
    mesh,
    donate_argnums=0,
  )
  evaluate_fn = parallel.jit_data_parallel(
    lambda state, batch: eval_step(graphdef, state, batch, members=members), mesh
  )
  return train, evaluate_fn


def make_ensemble_chunk(
  graphdef, configs, steps_per_epoch: int, mesh, max_steps: int, *, vmap_size: int | None = None
):
  """Jitted `train_chunk` (state, data, indices, start, num_steps, keys, active) -> (state, aux).

  The state is donated; outputs are replicated over `mesh`, as `make_ensemble_steps`' step.
  """
  members = Members.from_configs(configs, steps_per_epoch, vmap_size)
  return parallel.jit_data_parallel(
    lambda state, data, indices, start, num_steps, keys, active: train_chunk(
      graphdef,
      state,
      data,
      indices,
      start,
      num_steps,
      keys,
      active,
      members=members,
      max_steps=max_steps,
      mesh=mesh,
    ),
    mesh,
    donate_argnums=0,
  )


# ----------------------------------------------------------------------------------------
# Data and evaluation on the host.
# ----------------------------------------------------------------------------------------
def epoch_batch_indices(
  num_examples: int, *, batch_size: int, seeds: Sequence[int], epoch: int
) -> np.ndarray:
  """Each member's batches of `epoch`: int32 [K, S, B], row m drawn with seeds[m]."""
  return np.stack(
    [
      input_pipeline.epoch_batch_indices(num_examples, batch_size=batch_size, seed=s, epoch=epoch)
      for s in seeds
    ]
  )


def train_batches(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  batch_size: int,
  seeds: Sequence[int],
  epoch: int,
  start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields one epoch's member batches from `start_step`, each member's as its single run's.

  Yields:
    {'image': float32 [K, B, H, W, C] in [0, 1], 'label': int32 [K, B]}; row m is batch
    s of `input_pipeline.train_batches(..., seed=seeds[m], epoch=epoch)`.
  """
  indices = epoch_batch_indices(len(labels), batch_size=batch_size, seeds=seeds, epoch=epoch)
  for s in range(start_step, indices.shape[1]):
    yield input_pipeline.batch_at(images, labels, indices[:, s])


def evaluate(
  eval_fn: Callable,
  state,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  batch_size: int,
  mesh,
  weights: Sequence[losses.LossWeights],
) -> list[dict[str, float]]:
  """`steps.evaluate_split` of every member over (images [N,H,W,C], labels [N]): K dicts.

  weights: each member's `LossWeights` (`Members.weights`), for the total loss.
  """
  totals: list[dict[str, float]] = [{} for _ in weights]
  batches = input_pipeline.eval_batches(
    images, labels, batch_size=batch_size, multiple_of=parallel.num_devices(mesh)
  )
  for batch in parallel.prefetch(batches, mesh):
    for k, v in jax.device_get(eval_fn(state, batch)).items():
      for m, t in enumerate(totals):
        t[k] = t.get(k, 0.0) + float(v[m])
  return [steps_lib.metrics_from_sums(t, w) for t, w in zip(totals, weights, strict=True)]
