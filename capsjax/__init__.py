"""capsjax: capsule networks in JAX/Flax: CapsNet and a zoo of routing algorithms.

The package root re-exports the pure functions so research code can write
`from capsjax import dynamic_routing`. Importing it has no side effects: no device
queries, no config changes.
"""

from capsjax.caps_ops import RoutingResult, capsule_lengths, dynamic_routing, squash
from capsjax.losses import margin_loss, reconstruction_loss, spread_loss
from capsjax import routing
from capsjax.routing import Routed

__all__ = [
  "Routed",
  "RoutingResult",
  "capsule_lengths",
  "dynamic_routing",
  "margin_loss",
  "reconstruction_loss",
  "routing",
  "spread_loss",
  "squash",
]
