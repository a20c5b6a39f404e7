#!/usr/bin/env bash
# One session on a lent GPU: correctness checks, then every benchmark, results under $OUT.
#
#   bash benchmarks/gpu_session.sh            # OUT defaults to ./gpu_out
#
# Python packages the GPU image lacks travel as wheels in .whl/ (see BENCHMARKS.md).
# Each step has its own time limit and writes its output as it goes, so a step cut short
# still leaves the others' results.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  tail -n 3 "$OUT/$name.log"
}

step parity 120 python3 -m sammed3d_jax.parity tests/fixtures/golden_small
step bench "${BENCH_LIMIT:-330}" python3 benchmarks/run.py --device gpu \
  --batches 1,12,32,64 --train-batch 12 --attention cudnn,einsum \
  --train-variants cudnn,cudnn+remat,einsum --torch-compile --torch-compile-batches 1,32 \
  --out "$OUT/bench.json"
step profile 60 python3 benchmarks/profile_encoder.py --device gpu --batches 1,32 \
  --attention cudnn,einsum
step tests 110 python3 -m pytest -q -p no:cacheprovider tests/model/test_attention_impl.py -k "cudnn or validation"
cat "$OUT/steps.txt"
