import pytest

import actquant_jax as aq


def test_rules_resolve_in_order():
  cfg = aq.QuantConfig(act_mode="static", alpha="auto", rules=(
      aq.LayerRule(r"head$", skip=True),
      aq.LayerRule(r"fc\d", alpha=0.8),
      aq.LayerRule(r"block_1/fc2", qtype="float8_e4m3fn", act_mode="dynamic", alpha=None)))
  assert cfg.settings_for("head") == aq.config.LayerSettings(False, "int8", "static", "auto")
  assert cfg.settings_for("block_0/fc1").alpha == 0.8
  s = cfg.settings_for("block_1/fc2")
  assert (s.quantize, s.qtype, s.act_mode, s.alpha) == (True, "float8_e4m3fn", "dynamic", None)
  assert cfg.settings_for("block_0/q") == aq.config.LayerSettings(True, "int8", "static", "auto")


def test_bad_config():
  with pytest.raises(ValueError, match="qtype"):
    aq.QuantConfig(qtype="int4")
  with pytest.raises(ValueError, match="act_mode"):
    aq.QuantConfig(act_mode="per_channel")
  with pytest.raises(ValueError, match="alpha must be in"):
    aq.QuantConfig(alpha=1.5)
  with pytest.raises(ValueError, match="alpha_grid cannot contain 'auto'"):
    aq.QuantConfig(alpha_grid=("auto",))
  with pytest.raises(ValueError, match="bad regex"):
    aq.LayerRule("fc(")
  with pytest.raises(TypeError, match="LayerRule"):
    aq.QuantConfig(rules=("fc1",))
  with pytest.raises(ValueError, match="act_mode"):
    aq.LayerRule("x", act_mode="token")


def test_config_is_frozen_and_hashable():
  cfg = aq.QuantConfig(rules=[aq.LayerRule("a")])
  assert isinstance(cfg.rules, tuple)
  hash(cfg)
  with pytest.raises(Exception):
    cfg.alpha = 0.1
