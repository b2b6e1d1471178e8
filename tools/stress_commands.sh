#!/bin/bash
# The concurrent command loops of tests/test_robust.py (create, snapshot,
# delete, resize, resync across packs, pause/resume/cancel/throttle, writes)
# for longer and over several seeds: the daemon must live, every reply be ok
# or a documented errno, and an untouched LUN keep its data.
#   tools/stress_commands.sh [SECONDS_PER_SEED] [SEEDS]
set -e
cd "$(dirname "$0")/.."
secs=${1:-120}
seeds=${2:-5}
for seed in $(seq 1 "$seeds"); do
    FUSEARRAY_STRESS_SECONDS=$secs FUSEARRAY_STRESS_SEED=$seed \
        .venv/bin/python -m pytest -q -s tests/test_robust.py \
        -k test_concurrent_command_loops_with_cross_pack_resyncs | grep -E "^stress:|passed|failed"
done
