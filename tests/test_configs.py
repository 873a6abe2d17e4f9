"""Config files load, arguments parse, and bad overrides fail clearly."""

import os
import subprocess
import sys

import pytest

from vlp import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("total_steps", "batch_size", "seed", "log_every", "eval_every", "checkpoint_every",
        "data", "data_dir", "mesh", "sharding")


@pytest.mark.parametrize("spec", ["configs/uniter_base.py", "configs/uniter_base.py:tiny",
                                  "configs/uniter_base.py:size=tiny,data=coco_karpathy",
                                  "configs/uniter_large.py"])
def test_configs_load_with_contract_keys(spec):
  cfg = config_lib.load_config_file(os.path.join(REPO, spec))
  for key in KEYS:
    assert key in cfg, key
  assert sum(cfg.tasks.values()) > 0


def test_tiny_and_sizes():
  tiny = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py:tiny"))
  base = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py"))
  large = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_large.py"))
  assert (tiny.model.size, base.model.size, large.model.size) == ("tiny", "base", "large")
  assert base.optimizer.b2 == 0.98 and base.optimizer.grad_clip == 5.0
  assert base.feature_dim == 2048 and tiny.feature_dim == 64


def test_parse_arg_types_and_unknown():
  a = config_lib.parse_arg("tiny,steps=3", size="base", steps=10)
  assert a.size == "tiny" and a.steps == 3 and isinstance(a.steps, int)
  with pytest.raises(ValueError, match="unknown config argument 'nope'"):
    config_lib.parse_arg("nope=1", size="base")


def test_unknown_override_is_a_clear_flag_error():
  proc = subprocess.run(
      [sys.executable, "-m", "vlp.pretrain", "--config=configs/uniter_base.py:tiny",
       "--config.no_such_key=3", "--workdir=/tmp/unused"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "unknown config key(s) no_such_key" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_check_overrides_accepts_nested_known_keys():
  # Known nested keys pass: no SystemExit, nothing returned.
  assert config_lib.check_overrides(
      ["prog", "--config=configs/uniter_base.py:tiny",
       "--config.optimizer.learning_rate=0.1", "--config.mesh.data=1"]) is None
  keys = config_lib.valid_keys(config_lib.load_config_file("configs/uniter_base.py:tiny"))
  assert {"optimizer.learning_rate", "mesh.data"} <= set(keys)


def test_set_values_sets_dotted_keys_and_refuses_unknown_ones():
  cfg = config_lib.load_config_file("configs/uniter_base.py:tiny")
  out = config_lib.set_values(cfg, {"optimizer.learning_rate": 0.5, "batch_size": 8})
  assert out is cfg and cfg.optimizer.learning_rate == 0.5 and cfg.batch_size == 8
  with pytest.raises(KeyError, match="optimizer.no_such_key"):
    config_lib.set_values(cfg, {"optimizer.no_such_key": 1})
