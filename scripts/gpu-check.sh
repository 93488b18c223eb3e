#!/usr/bin/env bash
# GPU check of the runtime and the Qwen2 example, for a CUDA machine with nvcc and no network, in
# one call of at most 8 minutes. First the boundary ordering test (checkpoint-runtime's
# tests/gpu_ordering.rs: every layer ends in a chain of 4096 x 4096 matmuls that writes the
# boundary stored next, and offload-disk / offload-host / recompute must give mode none's
# gradients bit for bit, the disk files the forward's carries bit for bit), then the pinned host
# store's unit test; then build qwen2 with --features cuda, `verify` on the fixture for every mode
# (none, recompute, offload-host, offload-disk) and for a memory budget, a short training run per
# mode, and print a table with the engine's boundary bytes and transfer time per mode.
#
# Crates must travel with the tree. On a machine with network, from the repository root:
#
#   cargo vendor --locked --versioned-dirs vendor > /dev/null   # writes vendor/ (~250 MB)
#   tar -czf vendor.tar.gz vendor && rm -rf vendor              # ~29 MB, fits a 64 MiB transfer
#
# The script unpacks vendor.tar.gz when there is no vendor/, then builds with `--offline`
# against vendor/ (passed with --config; no .cargo/config.toml needed). Without either it tries
# `--offline` against the local cargo registry cache. Usage, from anywhere: scripts/gpu-check.sh
#
# Environment: CUDA_COMPUTE_CAP (default: from nvidia-smi), STEPS (training steps per mode,
# default 20), BUDGET_S (total seconds, default 470). FEATURES= (empty) is a dry run of the
# script itself on a CPU machine: no GPU probe, no cuda feature (the ordering test runs its CPU
# case, the pinned store test is skipped).
set -uo pipefail

cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${BUDGET_S:-470}
steps=${STEPS:-20}
left() { echo $((budget - ($(date +%s) - start))); }

features=${FEATURES-cuda}
echo "== machine"
if [ -n "$features" ]; then
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || {
    echo "nvidia-smi failed: no usable GPU"; exit 2; }
nvcc --version | tail -n 2 || { echo "nvcc not on PATH: the cuda build needs it"; exit 2; }
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
    export CUDA_COMPUTE_CAP=$cap
fi
echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
else
    echo "dry run on the CPU (FEATURES is empty)"
fi

if [ ! -d vendor ] && [ -f vendor.tar.gz ]; then
    echo "unpacking vendor.tar.gz"
    tar -xzf vendor.tar.gz || { echo "cannot unpack vendor.tar.gz"; exit 1; }
fi

source_args=()
if [ -d vendor ]; then
    source_args=(--config 'source.crates-io.replace-with="vendored-sources"'
                 --config 'source.vendored-sources.directory="vendor"')
fi
cargo_args=(--offline --release -p qwen2 "${source_args[@]}")
[ -n "$features" ] && cargo_args+=(--features "$features")
if [ -d vendor ]; then
    echo "crates: vendor/"
else
    echo "crates: no vendor/ directory, using the local registry cache (see the header)"
fi

mkdir -p target
declare -a rows

# outcome RC OUTPUT OK_TEXT: OK_TEXT, or FAIL with the error's start.
outcome() {
    if [ "$1" = 0 ]; then echo "$3"
    else echo "FAIL (rc $1): $(printf '%s\n' "$2" | grep '^error' | head -n 1 | cut -c8-60)"; fi
}

# test_outcome RC OUTPUT: pass, or FAIL with the start of the first panic message or error.
test_outcome() {
    if [ "$1" = 0 ]; then echo pass; return; fi
    local why
    why=$(printf '%s\n' "$2" | sed -n '/panicked at/{n;p;q}')
    [ -n "$why" ] || why=$(printf '%s\n' "$2" | grep -m1 -E '^error' )
    echo "FAIL (rc $1): $(printf '%s' "$why" | cut -c1-60)"
}

runtime_args=(--offline --release -p checkpoint-runtime "${source_args[@]}")
[ -n "$features" ] && runtime_args+=(--features "$features")

# The runtime's tests first: the ordering test must see a failure before anything else runs.
echo "== build the runtime's tests ($(left) s left)"
t0=$(date +%s)
timeout $(( $(left) - 90 )) cargo test "${runtime_args[@]}" --lib --test gpu_ordering --no-run \
    > target/gpu-check-test-build.log 2>&1
trc=$?
tail -n 5 target/gpu-check-test-build.log
if [ $trc != 0 ]; then
    echo "test build failed (rc $trc; 124 = out of time); full log: target/gpu-check-test-build.log"
    exit 1
fi

# Boundaries written by long kernel chains, then offloaded: exact gradients, exact files.
echo "== boundary ordering test ($(left) s left)"
o=$(timeout 120 cargo test "${runtime_args[@]}" --test gpu_ordering -- --nocapture 2>&1)
orc=$?
printf '%s\n' "$o" | grep -E '^(test |offload|recompute|thread|skipped)|panicked|differ|hold' | head -n 20
ms=$(printf '%s\n' "$o" | sed -n 's/^\(offload-disk\|offload-host\|recompute\): \([0-9]*\) ms$/\1 \2/p' \
    | tail -n 3 | paste -sd, - | sed 's/,/, /g')
rows+=("ordering|$(test_outcome $orc "$o")|exact grads + files|(test) ${ms:+$ms ms}|||")

# The pinned host store on its own: every dtype back bit for bit, buffers reused across steps.
if [ -n "$features" ] && [ "$(left)" -ge 120 ]; then
    echo "== pinned store test ($(left) s left)"
    p=$(timeout $(( $(left) - 90 )) cargo test "${runtime_args[@]}" --lib store::pinned \
        -- --nocapture 2>&1)
    prc=$?
    printf '%s\n' "$p" | grep -E '^(test |step|F|BF|thread|error)|boundaries back' | tail -n 14
    rows+=("pinned store|$(test_outcome $prc "$p")|exact, 4 dtypes|(unit test)|||")
fi
tests_s=$(( $(date +%s) - t0 ))

echo "== build qwen2 ($(left) s left)"
t0=$(date +%s)
timeout $(( $(left) - 60 )) cargo build "${cargo_args[@]}" > target/gpu-check-build.log 2>&1
brc=$?
tail -n 15 target/gpu-check-build.log
if [ $brc != 0 ]; then
    echo "build failed (rc $brc; 124 = out of time); full log: target/gpu-check-build.log"; exit 1
fi
build_s=$(( $(date +%s) - t0 ))
bin=target/release/qwen2
fixture=tests/fixtures/qwen2-tiny

# stat OUTPUT LABEL: the value of one row of the engine's Stats table ("| LABEL | VALUE |").
stat() {
    printf '%s\n' "$1" | sed -n "s/^| $2 *| *\([^|]*[^ |]\) *|\$/\1/p" | tail -n 1
}

# Boundaries per location, as the Stats table printed by `train` reports them.
where() {
    local d h k
    d=$(stat "$1" 'boundaries on device'); h=$(stat "$1" 'boundaries in host memory')
    k=$(stat "$1" 'boundaries on disk')
    [ -n "$d" ] && echo "$d / $h / $k, xfer $(stat "$1" 'transfer time')"
}

for mode in none recompute offload-host offload-disk; do
    if [ "$(left)" -lt 20 ]; then rows+=("$mode|skipped (time)||||||"); continue; fi
    v=$(timeout 60 "$bin" verify --model "$fixture" --reference "$fixture/reference.safetensors" \
        --checkpoint "$mode" 2>&1)
    vrc=$?
    worst=$(printf '%s\n' "$v" | sed -n 's/^worst: \([^(]*\).*/\1/p')
    verdict=$(outcome $vrc "$v" pass)
    tr=$(timeout 120 "$bin" train --checkpoint "$mode" --steps "$steps" 2>&1)
    trc=$?
    loss=$(printf '%s\n' "$tr" | sed -n 's/^loss \([^ ]*\) -> \([^ ]*\).*/\1 -> \2/p')
    tps=$(printf '%s\n' "$tr" | sed -n 's/.*: \([0-9]*\) tokens\/s$/\1/p')
    mem=$(printf '%s\n' "$tr" | sed -n 's/.*GPU in use \(.*\)$/\1/p')
    [ -n "$mem" ] || mem=$(printf '%s\n' "$tr" | sed -n 's/^peak memory: host RSS \([^,]*\).*/\1 (RSS)/p')
    [ $trc = 0 ] || loss=$(outcome $trc "$tr" "")
    rows+=("$mode|$verdict|$worst|$loss|$tps|$mem|$(where "$tr")")
    printf '%s\n' "-- $mode" "$v" | tail -n 3
    printf '%s\n' "$tr" | tail -n 18
done

# A memory budget of 0 MiB in offload-disk mode: every boundary on disk, chosen by the planner.
if [ "$(left)" -ge 20 ]; then
    v=$(timeout 60 "$bin" verify --model "$fixture" --reference "$fixture/reference.safetensors" \
        --checkpoint offload-disk --budget-mib 0 2>&1)
    vrc=$?
    worst=$(printf '%s\n' "$v" | sed -n 's/^worst: \([^(]*\).*/\1/p')
    rows+=("disk, budget 0|$(outcome $vrc "$v" pass)|$worst|(verify only)|||")
    printf '%s\n' "-- offload-disk --budget-mib 0" "$v" | grep -A8 '^budget plan' | head -n 10
fi

echo
echo "== summary (runtime tests ${tests_s} s, qwen2 build ${build_s} s, total $(( $(date +%s) - start )) s, ${features:-cpu} build, $steps training steps per mode)"
printf '%-14s | %-20s | %-30s | %-19s | %-6s | %-16s | %s\n' mode verify \
    "rel. err logits / loss / grad" "train loss" "tok/s" "peak memory" \
    "boundaries dev/host/disk, transfer"
for r in "${rows[@]}"; do
    IFS='|' read -r m v w l t g b <<< "$r"
    printf '%-14s | %-20s | %-30s | %-19s | %-6s | %-16s | %s\n' "$m" "$v" "$w" "$l" "$t" "$g" "$b"
done
