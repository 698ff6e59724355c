#!/usr/bin/env bash
# The three DDeP stages on the real data at hand, at CPU scale, each stage
# reading the previous one's checkpoint:
#   1. encoder pretraining: configs/classify_cifar10.py on CIFAR-10
#   2. DDeP: configs/ddep_camvid.py on CamVid's training images (labels unused),
#      with stage 1's encoder frozen
#   3. fine-tuning: configs/finetune_camvid.py at 1/30 of CamVid's labels from
#      stage 2's encoder + decoder, then test-split mIoU
# and finally checks that the encoder stage 3 started from is bit-identical to
# the one stage 1 saved (python -m ddep_jax.checkpoints.handover --check_encoder).
#
# Usage: launch/chain_cpu.sh WORKDIR [--dry_run]
# Environment (defaults in brackets):
#   PYTHON        interpreter with ddep_jax installed [.venv/bin/python, else python3]
#   SHARED_DATA   folder holding cifar10/ and camvid/ [<repo>/../shared/data]
#   DATA_DIR      TFDS data directory the datasets are prepared into [WORKDIR/tfds]
#   STAGE1_EPOCHS [6]   STAGE2_STEPS [200]   STAGE3_STEPS [100]
# Re-running on the same WORKDIR resumes: a finished stage is not repeated, an
# interrupted one continues from its last checkpoint.
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then usage; exit 2; fi
case $1 in /*) WORKDIR=$1 ;; *) WORKDIR=$PWD/$1 ;; esac  # before the cd below
DRY_RUN=0
if [[ "${2:-}" == --dry_run ]]; then DRY_RUN=1; elif [[ $# -gt 1 ]]; then usage; exit 2; fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
SHARED_DATA=${SHARED_DATA:-$REPO/../shared/data}
DATA_DIR=${DATA_DIR:-$WORKDIR/tfds}
STAGE1_EPOCHS=${STAGE1_EPOCHS:-6}
STAGE2_STEPS=${STAGE2_STEPS:-200}
STAGE3_STEPS=${STAGE3_STEPS:-100}
STAGE1=$WORKDIR/stage1_cifar10
STAGE2=$WORKDIR/stage2_ddep_camvid
STAGE3=$WORKDIR/stage3_camvid_1-30

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $DRY_RUN == 0 ]]; then
    local start=$SECONDS
    "$@"
    echo "  ($(( SECONDS - start )) s)"
  fi
}

for dataset in cifar10 camvid; do
  if [[ ! -d "$SHARED_DATA/$dataset" ]]; then
    echo "error: $SHARED_DATA/$dataset not found; set SHARED_DATA to the folder" \
         "holding cifar10/ and camvid/." >&2
    exit 1
  fi
done
cd "$REPO"
if [[ $DRY_RUN == 0 ]]; then mkdir -p "$WORKDIR"; fi

echo "== preparing CIFAR-10 and CamVid into $DATA_DIR (skipped when prepared)"
run "$PYTHON" -m ddep_jax.data.prepare --dataset=cifar10_jpeg \
  --manual_dir="$SHARED_DATA/cifar10" --data_dir="$DATA_DIR"
run "$PYTHON" -m ddep_jax.data.prepare --dataset=camvid \
  --manual_dir="$SHARED_DATA/camvid" --data_dir="$DATA_DIR"

echo "== stage 1: encoder pretraining on CIFAR-10"
run "$PYTHON" -m ddep_jax.main \
  --config="configs/classify_cifar10.py:epochs=$STAGE1_EPOCHS" \
  --config.data.data_dir="$DATA_DIR" --workdir="$STAGE1"

echo "== stage 2: DDeP on CamVid images, stage-1 encoder frozen"
run "$PYTHON" -m ddep_jax.main \
  --config="configs/ddep_camvid.py:steps=$STAGE2_STEPS,ckpt=$STAGE1" \
  --config.data.data_dir="$DATA_DIR" --workdir="$STAGE2"

echo "== stage 3: fine-tuning on 1/30 of CamVid's labels, test mIoU"
run "$PYTHON" -m ddep_jax.main \
  --config="configs/finetune_camvid.py:init=pretrained,ckpt=$STAGE2,fraction=1/30,steps=$STAGE3_STEPS" \
  --config.data.data_dir="$DATA_DIR" --workdir="$STAGE3"

echo "== encoder hand-over: stage 3's starting encoder vs stage 1's checkpoint"
run "$PYTHON" -m ddep_jax.checkpoints.handover --check_encoder="$STAGE3"

if [[ $DRY_RUN == 0 ]]; then
  "$PYTHON" - "$STAGE1" "$STAGE3" <<'PY'
import glob, json, os, sys
stage1, stage3 = sys.argv[1:]
def last(pattern):
    files = sorted(glob.glob(pattern))
    return json.load(open(files[-1])) if files else None
s1 = last(os.path.join(stage1, "eval", "test_*.json"))
s3 = last(os.path.join(stage3, "eval", "test_*.json"))
print(f"stage 1: CIFAR-10 test top-1 {s1['top1']:.4f} at step {s1['step']}")
print(f"stage 3: CamVid test mIoU {s3['miou']:.4f}, pixel accuracy "
      f"{s3['pixel_accuracy']:.4f} ({s3['num_images']} images)")
PY
fi
