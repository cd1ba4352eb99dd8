#!/usr/bin/env bash
# One epoch of each gradient method and of RSM on a GPU, at SD3.5-M shapes with random weights (bench/epoch.py),
# beside FDFO's under the same flags: docs/performance.md, "The new methods, one epoch each".
#   bash bench/gradient_methods_epochs.sh OUT_DIR first|second
# PickScore alone (the VLM has no gradient), 12 pairs = 24 images (RSM: its recipe's one prompt, 4 seeds × 30
# branches = 120 images), uncompiled, one epoch. A run that fails (out of memory) is reported and the next runs.
set -u
out=$1
common=(--reward-preset pickscore --compile never --num-epochs 1)
run() { name=$1; shift; python3 bench/epoch.py --out "$out/epoch-h200-$name.json" -- "${common[@]}" "$@" \
        > "$out/$name.log" 2>&1 || { echo "$name FAILED"; grep -m1 -E "OutOfMemoryError|Error" "$out/$name.log"; }
        grep -E "^pairs/s|^(encode|sample|reward|gradient|share|train|train_sync|optimizer) " "$out/$name.log"; }
if [ "$2" = first ]; then
    run fdfo-12pairs --method fdfo --total-pairs-per-epoch 12
    run draft-k1-12pairs --method draft --total-pairs-per-epoch 12
    run draft-k1-nockpt-12pairs --method draft --total-pairs-per-epoch 12 --draft.no-checkpointing
    run draft-k40-12pairs --method draft --total-pairs-per-epoch 12 --draft.k 40
else
    run draft-k40-nockpt-mb1-12pairs --method draft --total-pairs-per-epoch 12 --draft.k 40 --draft.no-checkpointing --train.micro-batch 1
    run fdfo_grad-rowI-12pairs --method fdfo_grad --total-pairs-per-epoch 12
    run fdfo_grad-rowJ-12pairs --method fdfo_grad --total-pairs-per-epoch 12 --grad.chain
    run rsm-60pairs --method rsm --total-pairs-per-epoch 60
fi
