"""capsjax: CapsNet with dynamic routing in JAX/Flax.

The package root re-exports the pure functions so research code can write
`from capsjax import dynamic_routing`. Importing it has no side effects: no device
queries, no config changes.
"""

from capsjax.caps_ops import RoutingResult, capsule_lengths, dynamic_routing, squash
from capsjax.losses import margin_loss, reconstruction_loss

__all__ = [
    "RoutingResult",
    "capsule_lengths",
    "dynamic_routing",
    "margin_loss",
    "reconstruction_loss",
    "squash",
]
