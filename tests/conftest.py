"""Test set-up: 8 forced CPU devices, absl flags parsed (grain workers need them),
a per-process persistent compilation cache so that tests which compile the same step
more than once (e.g. a run and its resumed continuation) compile it once, and
XLA's cheaper compilation settings.

Compilation dominates most tests on CPU: JAX_DISABLE_MOST_OPTIMIZATIONS roughly
halves XLA's compile time (measured on the five pretraining steps of a one-layer
model: 4.8 -> 2.7 CPU s each) for programs that run 1.5-2x slower, a good trade for
tests that run a program a few dozen times. It is set in the environment so that
the subprocesses the tests start inherit it; tests whose run time is execution
(the learning bars) turn it off with `full_optimization` below.
"""

import os
import tempfile

# XLA's older CPU fusion emitters compile these small programs in about 0.6x the CPU
# time of the default ones (tests other than the learning bars: 318 -> 223 CPU s); the
# learning bars run as fast with them and keep their margins (retrieval RSUM 201.6 vs
# 64.0, VQA 51.4 vs 48.0, grounding 37.9 vs 24.4 %).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

_CACHE = tempfile.mkdtemp(prefix="vlp_jax_cache_")  # Per process (each xdist worker).
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="module")
def full_optimization():
  """XLA's full optimisation for one module (execution-bound runs whose thresholds
  were measured with it). In-memory caches are cleared on the way in and out, so no
  program compiled in the other mode is reused; the persistent cache keys on the mode."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.clear_caches()
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)
  jax.clear_caches()


# Longest files first, so that with pytest-xdist (`make test`: two workers, whole files
# each) the long ones start at once and the short ones fill in around them. Unlisted
# files keep their usual order after these. CPU seconds on the 2-core dev machine:
SLOWEST_FIRST = (
    "test_learning_bars.py",  # 190
    "test_multiprocess_eval.py",  # 117
    "test_e2e_bert_pretrain.py",  # 44
    "test_multiprocess.py",  # 40
    "test_matching_protocol.py",  # 39
    "test_finetune.py",  # 36
    "test_distributed.py",  # 36
    "test_train_loop.py",  # 32
    "test_downstream_tasks.py",  # 20
    "test_matching_blocks.py",  # 19
    "test_pretrain_real_data.py",  # 17
    "test_export_import.py",  # 15
    "test_object_store.py",  # 15
    "test_aot.py",  # 15
    "test_bert_init.py",  # 13
    "test_matching_proposals.py",  # 12
    "test_finetune_real_data.py",  # 11
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable.
