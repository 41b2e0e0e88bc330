import dataclasses

import pytest

import actquant_jax as aq


def test_rules_resolve_in_order():
  cfg = aq.QuantConfig(act_mode="static", alpha="auto", rules=(
      aq.LayerRule(r"head$", skip=True),
      aq.LayerRule(r"fc\d", alpha=0.8),
      aq.LayerRule(r"block_1/fc2", qtype="float8_e4m3fn", act_mode="dynamic", alpha=None)), rotate=False)
  assert cfg.settings_for("head") == aq.config.LayerSettings(False, "int8", "static", "auto")
  assert cfg.settings_for("block_0/fc1").alpha == 0.8
  s = cfg.settings_for("block_1/fc2")
  assert (s.quantize, s.qtype, s.act_mode, s.alpha) == (True, "float8_e4m3fn", "dynamic", None)
  assert cfg.settings_for("block_0/q") == aq.config.LayerSettings(True, "int8", "static", "auto")


def test_bad_config():
  # The library's own error, and a message that names the argument and the bad value.
  with pytest.raises(aq.QuantizationError, match=r"qtype must be one of \('int8', 'float8_e4m3fn'\), got 'int4'"):
    aq.QuantConfig(qtype="int4")
  with pytest.raises(aq.QuantizationError, match=r"^QuantConfig: act_mode must be one of .*, got 'per_channel'"):
    aq.QuantConfig(act_mode="per_channel")
  with pytest.raises(aq.QuantizationError, match=r"^QuantConfig: alpha must be in \[0, 1\], 'auto' or None, got 1\.5"):
    aq.QuantConfig(alpha=1.5)
  with pytest.raises(aq.QuantizationError, match=r"^QuantConfig\.alpha_grid: alpha must be in .*, got -0\.1"):
    aq.QuantConfig(alpha_grid=(0.5, -0.1))
  with pytest.raises(aq.QuantizationError, match="^QuantConfig: alpha_grid cannot contain 'auto'"):
    aq.QuantConfig(alpha_grid=("auto",))
  with pytest.raises(aq.QuantizationError, match="^QuantConfig: alpha_grid must not be empty"):
    aq.QuantConfig(alpha_grid=())
  with pytest.raises(aq.QuantizationError, match=r"^LayerRule: bad regex 'fc\('"):
    aq.LayerRule("fc(")
  with pytest.raises(aq.QuantizationTypeError, match="^QuantConfig: rules must be LayerRule instances, got str"):
    aq.QuantConfig(rules=("fc1",))
  with pytest.raises(aq.QuantizationError, match=r"^LayerRule\('x'\): act_mode must be one of .*, got 'token'"):
    aq.LayerRule("x", act_mode="token")
  with pytest.raises(aq.QuantizationError, match=r"^LayerRule\('fc'\): alpha must be in .*, got 2"):
    aq.LayerRule("fc", alpha=2)


def test_config_is_frozen_and_hashable():
  cfg = aq.QuantConfig(rules=[aq.LayerRule("a")], alpha=0.5, rotate=False)
  assert isinstance(cfg.rules, tuple)
  assert hash(cfg) == hash(aq.QuantConfig(rules=(aq.LayerRule("a"),), alpha=0.5, rotate=False))  # equal configs, equal hashes
  with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'alpha'"):
    cfg.alpha = 0.1
  with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'skip'"):
    cfg.rules[0].skip = True
