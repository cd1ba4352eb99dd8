#!/usr/bin/env bash
# One FDFO epoch on each backbone's full shapes with random weights (bench/epoch.py), beside SD3.5-M's under the
# same flags: docs/performance.md, "Other backbones". One call of about 8 minutes on an H200:
#   bash bench/backbone_epochs.sh OUT_DIR
# PickScore alone, 12 pairs = 24 images of 512 px, 40 steps, uncompiled (the first epoch is then representative),
# each model's precision by --precision auto (fp16 recipe for SD3.5, bf16 for FLUX) and FLUX.1-dev at its
# pipeline's guidance 3.5. A run that fails (out of memory) is reported, retried at micro-batch 2, and the next runs.
set -u
out=${1:?usage: bash bench/backbone_epochs.sh OUT_DIR}
common=(--reward-preset pickscore --compile never --num-epochs 1 --total-pairs-per-epoch 12)
run() { name=$1; shift; python3 bench/epoch.py --out "$out/epoch-h200-$name.json" -- "${common[@]}" "$@" \
        > "$out/$name.log" 2>&1 || { echo "$name FAILED"; grep -m1 -E "OutOfMemoryError|Error" "$out/$name.log"
        return 1; }
        grep -E "^pairs/s|^(encode|sample|reward|train|train_sync|optimizer) " "$out/$name.log"; }
run sd35m-12pairs --pretrained-model sd35m-random
run sd35l-12pairs --pretrained-model sd35l-random || run sd35l-12pairs-mb2 --pretrained-model sd35l-random --train.micro-batch 2
run flux-12pairs --pretrained-model flux-random --sample.guidance-scale 3.5 ||
    run flux-12pairs-mb2 --pretrained-model flux-random --sample.guidance-scale 3.5 --train.micro-batch 2
