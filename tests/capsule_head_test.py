"""experiments.capsule_head: capsjax routing composed into a different (32x32x3) model."""

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import capsule_head


@pytest.mark.parametrize("head", capsule_head.HEADS)
def test_loss_decreases_on_a_fixed_batch(head):
  graphdef, state = capsule_head.create(head=head, routing_iterations=2)
  step = capsule_head.make_train_step(graphdef)
  batch = capsule_head.synthetic_batch(16, seed=1)
  losses = []
  for _ in range(8):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    assert 0.0 <= float(m["accuracy"]) <= 1.0
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.8 * losses[0], losses
  model, optimizer = nnx.merge(graphdef, state)
  assert int(optimizer.step[...]) == 8


@pytest.mark.parametrize(
  "head,n_params",
  [
    # conv 5*5*3*32+32, primary 5*5*32*64+64, head 200*10*8*8 (routed) or 8*10*8*8 (shared)
    ("routed", 2432 + 51264 + 128000),
    ("shared", 2432 + 51264 + 5120),
  ],
)
def test_shapes_couplings_and_parameter_count(head, n_params):
  model = capsule_head.TinyCapsNet(head=head, routing_iterations=3, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert sum(int(x.size) for x in jax.tree.leaves(params)) == n_params
  out = jax.jit(lambda x: model(x))(capsule_head.synthetic_batch(4)["image"])
  assert out["v"].shape == (4, 10, 8)
  assert out["class_scores"].shape == (4, 10)
  assert out["assignments"].shape == (4, 5 * 5 * 8, 10)  # 5x5 grid x 8 types
  np.testing.assert_allclose(np.asarray(out["assignments"]).sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.asarray(out["class_scores"]) < 1.0)


def test_one_iteration_gives_uniform_couplings():
  model = capsule_head.TinyCapsNet(head="shared", routing_iterations=1, rngs=nnx.Rngs(0))
  c = np.asarray(model(capsule_head.synthetic_batch(2)["image"])["assignments"])
  np.testing.assert_allclose(c, 0.1, rtol=1e-6)


def test_train_helper_and_errors():
  losses = capsule_head.train(steps=3, batch_size=8, head="shared", routing_iterations=1)
  assert len(losses) == 3 and all(np.isfinite(losses))
  with pytest.raises(ValueError, match="head must be one of"):
    capsule_head.TinyCapsNet(head="dense", rngs=nnx.Rngs(0))
  model = capsule_head.TinyCapsNet(rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"images must have shape \[B, 32, 32, 3\]"):
    model(np.zeros((2, 28, 28, 1), np.float32))
