"""Quickstart: a Flax model in W8A8 without touching its code.

  python examples/quickstart.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

import actquant_jax as aq


class MLPBlock(nn.Module):  # any Flax model written with plain nn.Dense
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    return x + nn.Dense(256, name="down")(nn.gelu(nn.Dense(1024, name="up")(h)))


model = MLPBlock()
keys = jax.random.split(jax.random.key(0), 5)
batches = [jax.random.normal(k, (8, 64, 256)) for k in keys[:4]]  # calibration data
params = model.init(keys[4], batches[0])
# Give the LayerNorm outlier channels, as trained LLMs have (and undo it in the weights).
ln, up = params["params"]["ln"], params["params"]["up"]
ln["scale"] = ln["scale"].at[:4].multiply(50.0)
up["kernel"] = up["kernel"].at[:4].divide(50.0)

stats = aq.calibrate(model, params, batches)  # per-channel input absmax of every Dense
x = jax.random.normal(jax.random.key(9), (8, 64, 256))
y_ref = model.apply(params, x)
run = jax.jit(aq.quantized_apply(model))  # same model code, int8 math in every Dense

for cfg in (aq.QuantConfig(act_mode="static", alpha=None, rotate=False),    # naive W8A8
            aq.QuantConfig(act_mode="static", alpha="auto", rotate=False),  # + SmoothQuant
            aq.QuantConfig(alpha="auto", rotate=False),                     # per-token scales
            aq.QuantConfig(),                          # the default: + Hadamard rotation
            aq.QuantConfig(qtype="float8_e4m3fn", alpha=None, rotate=False)):  # FP8 e4m3
  qparams, report = aq.quantize_params_with_report(params, stats, cfg)  # pure
  y = run(qparams, x)
  err = float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref))
  print(f"{cfg.qtype:14s} {cfg.act_mode:8s} alpha={str(cfg.alpha):5s} rotate={cfg.rotate!s:5s} "
        f"relative error {err:.2e}  "
        f"up: {report['up'].smoothing} (outliers {report['up'].outlier_ratio_before:.0f}x -> "
        f"{report['up'].outlier_ratio_after:.0f}x)")

print(aq.format_report(report))
