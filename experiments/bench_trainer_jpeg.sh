#!/usr/bin/env bash
# The trainer itself on the GPU (issue 10, Speed): full-size MiniCPM-V 4.6 architecture, random weights, the real
# vocabulary (model.name=reference), the grain pipeline decoding real 1344x1344 JPEGs from a JSONL file
# (experiments/make_jpeg_jsonl.py), AdamW update included. Usage:
#   bash experiments/bench_trainer_jpeg.sh DATA_DIR BATCH STEPS [extra --config.* flags]
set -euo pipefail
data=$1; batch=$2; steps=$3; shift 3
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
work=$(mktemp -d /tmp/bench_trainer.XXXX)
python3 -m uhd_jax.train --workdir "$work" --config configs/tiny.py \
  --config.model.name=reference --config.model.dtype=bfloat16 --config.model.unroll=True \
  --config.data.source=jsonl --config.data.path="$data/train.jsonl" --config.data.num_workers=8 \
  --config.data.seq_len=1152 --config.data.views_per_row=10 --config.data.tokens_per_view=1024 \
  --config.train.batch_size="$batch" --config.train.steps="$steps" --config.train.log_every=10 \
  --config.train.checkpoint_every=100000 "$@"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
rm -rf "$work"
