"""Bad config keys and values are rejected with a message that names them."""

import os
import subprocess
import sys

import pytest

from fedmerge_jax.config import ConfigError, base_config, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_valid():
  resolve(base_config())


def test_unknown_key_is_rejected_with_suggestion():
  config = base_config()
  config.num_global_model = 3
  with pytest.raises(
    ConfigError, match="Unknown config key 'num_global_model'.*'num_global_models'"
  ):
    resolve(config)


def test_unknown_nested_key_is_rejected():
  config = base_config()
  config.data.num_clinets = 3
  with pytest.raises(ConfigError, match="data.num_clinets.*data.num_clients"):
    resolve(config)


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("update_mode", "fast", "update_mode='fast' is not one of"),
    ("algorithm", "fedsgd", "algorithm='fedsgd' is not one of"),
    ("num_rounds", 0, "num_rounds=0 must be > 0"),
    ("client_lr", -1.0, "client_lr=-1.0 must be >= 0"),
    ("apfl_alpha", 1.5, r"apfl_alpha=1.5 must be in \[0, 1\]"),
    ("perfedavg_variant", "so", "perfedavg_variant='so' is not one of"),
  ],
)
def test_bad_values_are_rejected(key, value, match):
  config = base_config()
  config.unlock()
  config[key] = value
  with pytest.raises(ConfigError, match=match):
    resolve(config)


def test_partial_config_gets_defaults():
  config = base_config()
  del config["data"]
  config.unlock()
  full = resolve(config)
  assert full.data.name == "digits_groups"


def test_launch_rejects_unknown_override():
  result = subprocess.run(
    [sys.executable, "launch.py", "--config=configs/default.py", "--config.num_roundz=3"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "num_roundz" in result.stderr
