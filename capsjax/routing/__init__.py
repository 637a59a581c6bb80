"""Routing algorithms under one contract: votes in, `Routed(poses, activations, assignments)` out.

Every algorithm is a pure function

  fn(u_hat, num_iterations, *, stop_gradient=False, eps=..., **algorithm_kwargs) -> Routed

with u_hat [..., N_in, N_out, D] the votes (predictions) of every input capsule for every
parent, any number of leading batch dimensions, and `num_iterations` a static integer >= 1
(`check_iterations`; changing it recompiles). `ROUTINGS` maps a name to each function and
`get(name)` looks one up; algorithm-specific inputs have defaults, so `get(name)(u_hat, r)`
works for every name. `predict_and_route` is dynamic routing fused with the fully connected
layer's votes u W, with a hand-written gradient.

Keywords every algorithm shares:
  stop_gradient: the votes are stop-gradiented wherever they feed the routing weights, so
    the gradient reaches u_hat only through the last pass (the weighted sum of the votes and
    what follows it), never through how the weights were found; values are unchanged. Where
    the weights do not depend on the votes (one iteration of dynamic, EM or inverted
    dot-product routing from zero parents: uniform weights) it has no effect; self-attention
    computes its one pass's weights from the votes, so it detaches them. Each function says
    what happens to its other inputs' gradients.
  eps: the algorithm's one numerical epsilon: under the square root of the squash and of the
    capsule lengths (dynamic, self-attention), in the LayerNorm (inverted dot-product), the
    variance floor and empty-parent guard of the M-step (EM).

Defaults compute each paper's equations as its authors' published code does: where the code
departs from the text, the code wins, because it produced the reported numbers, and the
text's variant is a keyword (inverted dot-product's agreement scale: 1/sqrt(D) in the code,
`agreement_scale=1.0` for the paper's formula). EM has no code by its authors, so its
defaults are the paper's, with the λ schedule the authors gave on OpenReview. Learned
parameters are optional arguments whose default (None or 0) leaves them out.

Two additive parameters live in different spaces, hence two names: dynamic routing's `bias`
b_j [N_out, D] is added to every pre-squash pose s_j (pose space, the authors' code), while
self-attention's `log_prior` B_ij [N_in, N_out] is added to the coupling coefficients after
their softmax (weight space; the paper's name, though it is not added in log space).

Shape legend: N_in input capsules, N_out parents, D pose size. Einsum letters: n=N_in,
m=N_out, o=D. The votes are transposed once to [..., N_out, N_in, D], where both routing
contractions are batched mat-vecs over leading axes, which XLA:CPU runs much faster than the
same einsums on [..., N_in, N_out, D] (RESULTS.md). HIGHEST precision keeps float32 routing
exact on GPU/TPU (no TF32/bf16 passes).

dtypes: bfloat16/float16 votes are routed in float32 and the results cast back to the input
dtype (softmaxes, logs and normalisations lose most of their bits in bfloat16); float32 and
float64 stay as they are. Each function is safe under `jit`, `vmap` and `grad` (forward and
reverse mode, except `predict_and_route`: reverse only); iterations run in a `lax.fori_loop`
(or `lax.scan`), so the traced program has the same size for any iteration count.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from capsjax.routing.common import Routed, check_iterations
from capsjax.routing.dynamic_routing import dynamic, predict_and_route
from capsjax.routing.em_routing import em, em_inverse_temperatures
from capsjax.routing.inverted_dot_product_routing import inverted_dot_product, layer_norm
from capsjax.routing.self_attention_routing import efficient_squash, self_attention

__all__ = [
  "ROUTINGS",
  "Routed",
  "RoutingFn",
  "check_iterations",
  "dynamic",
  "efficient_squash",
  "em",
  "em_inverse_temperatures",
  "get",
  "inverted_dot_product",
  "layer_norm",
  "predict_and_route",
  "self_attention",
]

RoutingFn = Callable[..., Routed]

# Read-only, so no caller can change what `get` returns for everyone else.
ROUTINGS: types.MappingProxyType[str, RoutingFn] = types.MappingProxyType(
  {
    "dynamic": dynamic,
    "em": em,
    "inverted_dot_product": inverted_dot_product,
    "self_attention": self_attention,
  }
)


def get(name: str) -> RoutingFn:
  """The routing function registered as `name` in `ROUTINGS`.

  Raises:
    ValueError: naming `name` and the valid names, if `name` is not registered.
  """
  try:
    return ROUTINGS[name]
  except (KeyError, TypeError):
    raise ValueError(
      f"unknown routing {name!r}; valid routings: {', '.join(map(repr, ROUTINGS))}"
    ) from None
