"""Test set-up: 8 forced CPU devices, absl flags parsed (grain workers need them),
and a per-session persistent compilation cache so that tests which compile the same
step more than once (e.g. a run and its resumed continuation) compile it once."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

_CACHE = tempfile.mkdtemp(prefix="vlp_jax_cache_")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
