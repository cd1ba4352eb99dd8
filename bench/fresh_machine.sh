#!/usr/bin/env bash
# Start-up on a fresh GPU machine, in one go (docs/performance.md, "Start-up"): pinning 16 GiB with PyTorch's
# default and with the threaded host registration Parking uses, the slowest imports, the sanity command with an
# empty Inductor cache, then two epochs of it under --max-memory-gib 22 with PickScore.
#   bash bench/fresh_machine.sh OUT_DIR
set -u
out=${1:?usage: bash bench/fresh_machine.sh OUT_DIR}
mkdir -p "$out"
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)  # empty: a cold compile
pin='import sys, time, torch
if sys.argv[1] != "default": torch._C._accelerator_setAllocatorSettings(sys.argv[1])
torch.zeros(1, device="cuda"); start = time.perf_counter()
torch.empty(16 * 2**30, dtype=torch.uint8, pin_memory=True)
print(f"pinning 16 GiB, {sys.argv[1]}: {time.perf_counter() - start:.2f} s")'
for setting in default "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"; do
    python3 -c "$pin" "$setting" | tee -a "$out/pinning.txt"
done
python3 -X importtime -c "import fdfo.harness.training_loop" 2> "$out/importtime.txt"
sort -t'|' -k2 -n -r "$out/importtime.txt" | head -25
timeout 330 python3 bench/startup.py --out "$out/startup-sanity-cold.json" -- --num-epochs 5 \
    --total-pairs-per-epoch 16 > "$out/sanity-cold.log" 2>&1
timeout 190 python3 bench/startup.py --out "$out/startup-22gib-pickscore-2epochs.json" -- --num-epochs 2 \
    --total-pairs-per-epoch 16 --reward-preset pickscore --max-memory-gib 22 > "$out/22gib.log" 2>&1
