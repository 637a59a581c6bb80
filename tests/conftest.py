"""Test set-up: force 4 host CPU devices before anything imports jax.

The CPU device count is fixed when the backend starts (setting it later does nothing), so
this has to run at conftest import time, before any test module imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# The tests run XLA:CPU the way `capsjax.main` does (convs off YNNPACK), so 'auto' resolves
# to the same conv lowering users get. Importing jax does not start its backends.
from capsjax.run import cpu_runtime  # noqa: E402 (after XLA_FLAGS: jax reads them at import)

cpu_runtime.use_xla_cpu_convs()
# Keep tests from touching the user's TFDS directory or the network.
os.environ.setdefault(
  "TFDS_DATA_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "capsjax_test_tfds")
)
