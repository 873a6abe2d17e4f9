"""The start-up every `python -m vlp.*` command shares.

    _CONFIG = entry.config_flag()
    ...
    if __name__ == "__main__":
      entry.run(main, config=_CONFIG, required=["workdir"])

`run` checks the `--config.*` overrides against the config file before absl
parses them (an unknown key is a flag error that lists the valid keys, not a
traceback), marks the required flags, refuses stray positional arguments, and,
before anything touches the devices, keeps JAX off an installed libtpu where
there is no TPU (`runtime.skip_absent_tpu`), splits the CPU platform into
`config.cpu_devices` devices and starts the multi-host runtime (the flags of
`vlp.parallel.runtime`). Then it calls `main(config)` (None for a command
without a config). A run stopped by SIGTERM after writing its checkpoint exits
with status `preemption.EXIT_PREEMPTED` (42), which the launchers requeue on.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from vlp import config_lib
from vlp.parallel import preemption, runtime  # runtime defines the multi-host flags.


@functools.cache
def config_flag() -> flags.FlagHolder:
  """`--config=path[:arg]`: a config file, locked (an unknown key is an error).

  Defined once per process: each command module asks for it at import, and a process
  that imports two of them (a test session, a tool reusing another's functions) gets
  the one flag instead of absl's duplicate-flag error.
  """
  return config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                         lock_config=True)


def run(main: Callable[[ml_collections.ConfigDict | None], None], *,
        config: flags.FlagHolder | None = None, required: Sequence[str] = (),
        devices: bool = True) -> None:
  """Parses the flags and starts `main(config)` (see the module docstring).

  Args:
    main: the command's body; gets the locked config (None without `config`).
    config: the holder `config_flag()` returned; `--config` is then required.
    required: other flags the command cannot run without.
    devices: False leaves the devices to `main` (`vlp.tools.aot` compiles for a
      topology it sets up itself and never joins a multi-host runtime).
  """
  def start(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = config.value if config is not None else None
    runtime.skip_absent_tpu()
    if devices:
      runtime.initialize_from_flags(cpu_devices=cfg.cpu_devices if cfg is not None else 0)
    try:
      main(cfg)
    except preemption.Preempted as why:
      # The checkpoint is written: this status asks the launcher to requeue the run.
      print(f"{why}; exit status {preemption.EXIT_PREEMPTED}: requeue with the same "
            "--workdir to resume", file=sys.stderr, flush=True)
      sys.exit(preemption.EXIT_PREEMPTED)

  config_lib.check_overrides(sys.argv)
  flags.mark_flags_as_required((["config"] if config is not None else []) + list(required))
  app.run(start)
