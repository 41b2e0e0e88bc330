#!/usr/bin/env bash
# Everything to run when a GPU is lent, in one call (the device machine keeps nothing):
# the `gpu`-marked tests, the GEMM benchmarks per backend, the shipped LLM end to end.
# Each step has its own time limit, so one hang cannot eat the lease; logs go to $OUT.
#
#   tools/gpu_session.sh [steps...]     steps: env tests triton mosaic mosaic_ws llm bench-llm suite
#
# Runs on the machine's own python3 and packages (PYTHONPATH, no install: the image's jax
# may lie outside our pinned range only by patch level).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
PY=${PY:-python3}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env tests triton mosaic mosaic_ws llm)

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: rc=${PIPESTATUS[0]} in $((SECONDS - t0))s"
}

for s in "${steps[@]}"; do
  case $s in
    env) step env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv; \
      $PY -c 'import jax, jaxlib, flax, optax; print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \"flax\", flax.__version__, jax.devices())'" ;;
    tests) step tests 300 $PY -m pytest -m gpu -q -rs -p no:cacheprovider --timeout 120 tests ;;
    triton|mosaic|mosaic_ws) step "bench_$s" 200 $PY benchmarks/bench_matmul.py --backend "$s" ;;
    llm) step llm 240 $PY examples/llm/run.py --eval 16 --gen 32 --json "$OUT/llm.json" --png "$OUT/llm.png" ;;
    bench-llm) step bench_llm 300 $PY benchmarks/bench_llm.py --layers 8 --prefill 512 --json "$OUT/bench_llm.json" ;;
    suite) step suite 400 env JAX_PLATFORMS=cpu $PY -m pytest -q -x -n 8 -p no:cacheprovider -m "not gpu" tests ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
