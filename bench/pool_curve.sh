#!/usr/bin/env bash
# Pool-size curve on PneumoniaMNIST (configs/pneumonia_pool.yaml): pretrain on 10%, 30%, 100% of the
# train images (an external npz pool, labels dropped), fine-tune at 1% and 10% labels, 3 seeds.
#   bash bench/pool_curve.sh OUT_DIR "INITS" "FRACTIONS_OF_POOL"     e.g. /work/pool_runs "[mae]" "0.1 0.3 1.0"
# Scratch baselines (no pretraining, so no pool) run once: INITS="[scratch, 'scratch:resnet18']" POOLS=none.
# EXTRA: more overrides for every run, e.g. EXTRA="study.seeds=[0]"; SPARK_EPOCHS: SparK pretraining epochs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs}; INITS=${2:-"[mae, 'spark:resnet18']"}; POOLS=${3:-"0.1 0.3 1.0"}
NPZ=../shared/datasets/pneumoniamnist/pneumoniamnist_28.npz
PY=${PY:-.venv/bin/python}
CNN='["encoder.width=16", "encoder.num_stages=3"]'
OVR="{}"
case "$INITS" in *spark:resnet18*) OVR="{'spark:resnet18': [\"encoder.width=16\", \"encoder.num_stages=3\", \"pretrain.mask_ratio=0.6\", \"pretrain.epochs=${SPARK_EPOCHS:-20}\"]}";; esac
case "$INITS" in *scratch:resnet18*) OVR="{'scratch:resnet18': $CNN}";; esac
for f in $POOLS; do
  if [ "$f" = none ]; then
    extra=(run.name=pool_scratch "data.pretrain_on_labelled=true" "data.unlabelled=[]")
  else
    extra=(run.name="pool_f$f" "data.unlabelled=[{path: $NPZ, kind: npz, keys: [train_images], fraction: $f}]")
  fi
  OMP_NUM_THREADS=1 "$PY" -m medmim.cli study -c pneumonia_pool run.out_dir="$OUT" run.num_threads=1 \
    "study.inits=$INITS" "study.overrides=$OVR" "${extra[@]}" ${EXTRA:-}
done
