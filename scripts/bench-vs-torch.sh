#!/usr/bin/env bash
# One Qwen2 training step, ours against PyTorch + transformers (eager), on this CPU.
#
#   scripts/bench-vs-torch.sh [--layers 8,16] [--modes none,recompute] [--seq 256] [--batch 4]
#                             [--steps 3] [--warmup 1] [--out DIR]
#
# Installs torch and transformers into .venv-bench/ (git-ignored) from the package registry
# the first time (extra pip arguments, e.g. a CPU-only index: TORCH_PIP_ARGS="..."), builds the
# Rust bench once, then runs, for every configuration, both implementations one after the
# other (which one goes first alternates), each in a fresh process: same shape, f32, random
# init, random tokens, AdamW and gradient clipping; `recompute` is transformers'
# gradient_checkpointing_enable on the PyTorch side. Prints a table with the ratios and writes
# it as CSV to DIR (default target/bench/vs-torch). Not part of CI.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

layers=8,16 modes=none,recompute seqs=256 batch=4 steps=3 warmup=1
out=${CARGO_TARGET_DIR:-$root/target}/bench/vs-torch
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
    case $1 in
        --layers) layers=$2 ;;
        --modes) modes=$2 ;;
        --seq) seqs=$2 ;;
        --batch) batch=$2 ;;
        --steps) steps=$2 ;;
        --warmup) warmup=$2 ;;
        --out) out=$2 ;;
        *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift 2
done
for mode in ${modes//,/ }; do
    case $mode in
        none | recompute) ;;
        *) echo "--modes $mode: PyTorch has none and recompute (gradient_checkpointing_enable) only" >&2; exit 2 ;;
    esac
done

venv=$root/.venv-bench
if ! "$venv/bin/python" -c 'import torch, transformers' 2>/dev/null; then
    echo "installing torch and transformers into $venv" >&2
    python3 -m venv "$venv"
    # shellcheck disable=SC2086 # TORCH_PIP_ARGS is a list of arguments
    "$venv/bin/pip" install --quiet ${TORCH_PIP_ARGS:-} torch transformers
fi
"$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "threads", torch.get_num_threads())' >&2

cargo bench -p qwen2 --bench step --no-run >&2
mkdir -p "$out"
out=$(cd "$out" && pwd) # cargo runs the bench in examples/qwen2: give it absolute paths
rows=$out/rows.jsonl
: >"$rows"
echo "load before: $(uptime)" >&2

ours() { # layers mode seq
    local csv=$out/ours-$1-$2-$3.csv
    cargo bench -q -p qwen2 --bench step -- --layers "$1" --modes "$2" --segments 1 --seq "$3" \
        --batch "$batch" --steps "$steps" --warmup "$warmup" --csv "$csv" --svg "$out/ours-$1-$2-$3.svg" >&2
    "$venv/bin/python" - "$csv" >>"$rows" <<'EOF'
import csv, json, sys
row = list(csv.DictReader(open(sys.argv[1])))[-1]
print(json.dumps({"impl": "ours", **row}))
EOF
}
torch() { # layers mode seq
    "$venv/bin/python" scripts/torch_step.py --layers "$1" --mode "$2" --seq "$3" --batch "$batch" \
        --steps "$steps" --warmup "$warmup" | sed -n 's/^ROW //p' >>"$rows"
}

i=0
for seq in ${seqs//,/ }; do
    for l in ${layers//,/ }; do
        for mode in ${modes//,/ }; do
            echo "== $l layers, seq $seq, $mode" >&2
            if [ $((i % 2)) -eq 0 ]; then torch "$l" "$mode" "$seq"; ours "$l" "$mode" "$seq"
            else ours "$l" "$mode" "$seq"; torch "$l" "$mode" "$seq"; fi
            i=$((i + 1))
        done
    done
done
echo "load after: $(uptime)" >&2

"$venv/bin/python" - "$rows" "$out/vs-torch.csv" "$batch" "$steps" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
mib = lambda b: float(b) / 2**20
pairs = {}
for r in rows:
    pairs.setdefault((int(r["layers"]), int(r["seq"]), r["mode"]), {})[r["impl"]] = r
print(f"\nQwen2 training step, batch {sys.argv[3]}, f32, CPU; median of {sys.argv[4]} steps")
print("| layers | seq | mode | torch step (s) | ours step (s) | ours / torch | torch fwd (s) | ours fwd (s) | torch peak RSS (MiB) | ours peak RSS (MiB) | ours / torch |")
print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
lines = ["layers,seq,mode,torch_step_ms,ours_step_ms,torch_forward_ms,ours_forward_ms,torch_peak_rss_bytes,ours_peak_rss_bytes"]
for (l, s, m), p in sorted(pairs.items()):
    t, o = p.get("torch"), p.get("ours")
    if not (t and o):
        print(f"| {l} | {s} | {m} | missing: {'torch' if not t else 'ours'} |")
        continue
    ts, os_ = float(t["step_ms"]), float(o["step_ms"])
    tr, or_ = float(t["peak_rss"]), float(o["peak_rss_bytes"] or "nan")
    print(f"| {l} | {s} | {m} | {ts/1e3:.2f} | {os_/1e3:.2f} | {os_/ts:.2f} | {float(t['forward_ms'])/1e3:.2f} | {float(o['forward_ms'])/1e3:.2f} | {mib(tr):.0f} | {mib(or_):.0f} | {or_/tr:.2f} |")
    lines.append(f"{l},{s},{m},{ts:.1f},{os_:.1f},{t['forward_ms']:.1f},{o['forward_ms']},{int(tr)},{int(or_)}")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print(f"\nwrote {sys.argv[2]}")
EOF
