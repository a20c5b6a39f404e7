#!/usr/bin/env bash
# One session on a lent GPU: every benchmark, results under $OUT.
#
#   bash benchmarks/gpu_session.sh                         # all steps; OUT defaults to ./gpu_out
#   STEPS="train encoder" bash benchmarks/gpu_session.sh   # a subset, in the order given
#   STEPS=encoder ATTENTION=cudnn,cudnn+tanh BATCHES=1,32 bash benchmarks/gpu_session.sh
#                                   # variants side by side (see run.py --attention)
#
# Python packages the GPU image lacks travel as wheels in .whl/ (see BENCHMARKS.md).
# Each step has its own time limit and writes its output as it goes, so a step cut short
# still leaves the others' results. A fresh machine's first CUDA start-up and compilations
# are slow: the default steps' limits add up to more than fits one 600 s call, so a call
# names the steps it can afford. Durations seen on an H200: `encoder` with four variants at
# batches 1 and 32 (original compiled at batch 1) 231 s; `train` with its two default
# variants (unrolled and device loop) 265 s; `train_cmdbuf` 113 s; `click` 35 s;
# `dispatch` ~60 s (not yet run: three compilations per target); `train_profile` 95 s;
# `encoder_profile` at batch 32 21 s, at batch 1 16 s. The original is compiled in both
# torch.compile modes (the compiled figures are the faster one's: "reduce-overhead" adds CUDA
# graphs, as XLA's command buffers do for ours); by default the `encoder` step compiles it at
# batch 16 as well, for the throughput ratio. The training step's default on a GPU unrolls the
# click loop (compiled in ~160 s on an H200); `+scan` times the device loop (~80 s).
set -uo pipefail
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-train click dispatch train_profile encoder_profile encoder tests}
mkdir -p "$OUT"
: >"$OUT/steps.txt"
NO_CMD_BUFFERS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="  # last flag wins
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
  tail -n 2 "$OUT/$name.log"
}

bench() {  # bench NAME SECONDS ARGS...: one section of run.py, its JSON in $OUT/NAME.json
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" python3 benchmarks/run.py --device gpu --out "$OUT/$name.json" "$@"
}

for s in $STEPS; do
  case $s in
    # The original's training step needs ~63 GiB: it runs before anything else holds memory.
    train) bench train "${TRAIN_LIMIT:-360}" --skip encoder,accuracy,click,pipeline \
      --train-batch 12 --train-variants "${TRAIN_VARIANTS:-cudnn,cudnn+scan}" ;;
    # The same with XLA's command buffers (CUDA graphs) also capturing device loops (the
    # click loop) and conditionals, which the default leaves out.
    train_cmdbuf) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
      bench train_cmdbuf "${CMDBUF_LIMIT:-200}" --skip encoder,accuracy,click,pipeline \
      --train-batch 12 --train-variants "${CMDBUF_VARIANTS:-cudnn+scan}" ;;
    click) bench click 70 --skip encoder,accuracy,train,pipeline ;;
    # Host time per call by how the weights are passed (separate / packed / compiled in).
    # DISPATCH_ATTENTION="cudnn einsum" adds the encoder without cuDNN calls.
    dispatch) for t in encoder click; do
        step "dispatch_$t" 90 python3 benchmarks/dispatch_overhead.py --device gpu --target "$t"
      done
      for a in ${DISPATCH_ATTENTION:-}; do
        step "dispatch_encoder_$a" 90 python3 benchmarks/dispatch_overhead.py --device gpu \
          --attention "$a"
      done ;;
    # Profiles run with command buffers (CUDA graphs) off: inside one, kernels cannot be
    # told apart (the wall time is then higher than in the benchmarks).
    train_profile) XLA_FLAGS="$NO_CMD_BUFFERS" \
      step train_profile "${TRAIN_PROFILE_LIMIT:-240}" python3 benchmarks/profile_train_step.py \
      --device gpu --batch 12 --attention cudnn --by source --top 25 \
      --click-loop "${PROFILE_CLICK_LOOP:-scan}" ;;  # a device loop: per-pass times
    encoder_profile) for b in ${PROFILE_BATCHES:-1 32}; do
        XLA_FLAGS="$NO_CMD_BUFFERS" step "encoder_profile_b$b" 40 \
          python3 benchmarks/profile_train_step.py --device gpu --target encoder --by source \
          --batch "$b" --attention cudnn --repeats 5 --top 20 ${PROFILE_ARGS:-}
      done ;;
    encoder) bench encoder "${ENCODER_LIMIT:-200}" --skip train,click,pipeline \
      --batches "${BATCHES:-1,16,64}" --attention "${ATTENTION:-cudnn}" --torch-compile \
      --torch-compile-batches "${COMPILE_BATCHES:-1,16}" \
      --torch-compile-modes "${COMPILE_MODES:-default,reduce-overhead}" ;;
    # Training, click and encoder in one process (one start-up): the short session.
    quick) bench quick "${QUICK_LIMIT:-330}" --skip accuracy,pipeline --train-batch 12 \
      --train-variants "${TRAIN_VARIANTS:-cudnn}" --batches "${BATCHES:-1,32}" \
      --attention "${ATTENTION:-cudnn}" --torch-compile --torch-compile-batches "${COMPILE_BATCHES:-1}" \
      --torch-compile-modes "${COMPILE_MODES:-default,reduce-overhead}" ;;
    tests) step tests "${TESTS_LIMIT:-120}" python3 -m pytest -q -p no:cacheprovider \
      tests/model/test_attention_impl.py -k "${TESTS_K:-cudnn and odd_tokens}" ;;
    # The Pallas attention kernel compiled by Triton (elsewhere the tests interpret it).
    pallas_tests) step pallas_tests "${TESTS_LIMIT:-120}" python3 -m pytest -q \
      -p no:cacheprovider tests/model/test_rel_pos_attention.py -m "slow or not slow" ;;
    # Restart cost: the demo job with the full model, run for one step and resumed for a
    # second; the log's "train step compiled / loaded from the compilation cache in N s".
    restart) for n in 1 2; do
        step "restart_$n" "${RESTART_LIMIT:-280}" python3 train.py --workdir "$OUT/restart" \
          --config.model.variant=vit_b_ori --config.data.batch_size=2 --config.eval_every=0 \
          --config.total_steps="$n"
        grep -h "train step" "$OUT/restart_$n.log" | tee -a "$OUT/steps.txt"
      done ;;
    *) echo "unknown step $s" >&2 ;;
  esac
done
cat "$OUT/steps.txt"
