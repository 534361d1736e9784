#!/bin/bash
# Time to first token and decode speed of the full-size model (issue 11), one process per setting (XLA_FLAGS are
# read once per process); each writes $OUT/NAME.json and NAME.log:
#   bench_served / bench_stacked: experiments/bench_generate.py with the weights in the serving layout
#     (infer.engine.serving_params) or stacked as in training
#   profile: experiments/profile_decode.py (kernel profile of the prefill and of the decode loop), served vs stacked
#   dsfusion: the stacked layout with XLA's dynamic-slice fusion (a gemm reads its weight slice in place)
#   OUT=/tmp/out bash experiments/ttft_sweep.sh          # a GPU, full-size model
OUT=${OUT:-/tmp/ttft_sweep}
mkdir -p "$OUT"
run() {
  local name=$1 flags=$2 script=$3; shift 3
  local t0=$SECONDS
  XLA_FLAGS="$flags" timeout "${LIMIT:-170}" python3 "experiments/$script" --out "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - t0)) s"; grep -E '^(scan|unroll|\{"batch)' "$OUT/$name.log" | cut -c1-250
}
run bench_served "" bench_generate.py --layout served --batches 1,8,32 --new-tokens 128
run bench_stacked "" bench_generate.py --layout stacked --batches 1 --new-tokens 128
run profile "" profile_decode.py --variants scan+served,scan --batches 1 --new-tokens 64
run dsfusion "--xla_gpu_enable_dynamic_slice_fusion=true" profile_decode.py --variants scan --batches 1 --new-tokens 64
