#!/usr/bin/env bash
# One GPU session's benchmarks in about 540 s of wall time: the machine, bench_pretrain.py (smit_small, 96^3,
# batch 6, by priority: authors-equivalent fp32, bf16 (the default), bf16 + torch.compile with CUDA graphs, bf16 +
# torch.compile, the loader with 8 and 4 workers, bf16 with cuDNN attention, bf16 with math attention, fp32),
# bench_network.py when NETWORK_S is set (bf16, 96^3 and 128^3; its figures are in the README already) and, when
# COLLAPSE_S is set, bench_collapse.py (400 steps of smit_small on phantoms, the settings of COLLAPSE_SETTINGS side
# by side: by default the authors' teacher temperature 0.07 next to the default 0.04; teacher entropy, spread and
# every loss term), then benchmarks/gpu_extra.sh if that file exists. Every part runs under `timeout`, capped by what
# is left of the session, and one failing part does not stop the next.
#
#     OUT=/path/to/folder bash benchmarks/gpu_session.sh     # on the GPU machine, from the repository root
#     DRY_RUN=1 bash benchmarks/gpu_session.sh               # the same parts on the CPU with tiny settings
#
# Writes $OUT/gpu_session.txt (all output), $OUT/bench_pretrain.json, $OUT/bench_network.json and
# $OUT/bench_collapse.json. gpu_extra.sh runs last with OUT, REPO, PYTHONPATH and EXTRA_LIMIT_S (its seconds)
# exported.
# Knobs (seconds): SESSION_S (540, the whole run), PRETRAIN_S (500), NETWORK_S (0: skipped), COLLAPSE_S (0: skipped);
# PRETRAIN_SETTINGS (the bench_pretrain.py settings), COLLAPSE_SETTINGS (NAME=smit_pretrain options, separated by
# ';'), BENCH_PRETRAIN_ARGS adds arguments to bench_pretrain.py (e.g.
# --no_compile; time a part leaves unused goes to the parts after it).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
DRY_RUN=${DRY_RUN:-0}
if [[ $DRY_RUN == 1 && -z ${OUT:-} ]]; then
    OUT=$(mktemp -d /tmp/gpu_session_dry.XXXXXX)
fi
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
SESSION_S=${SESSION_S:-$( ((DRY_RUN)) && echo 600 || echo 540)}
PRETRAIN_S=${PRETRAIN_S:-500}
NETWORK_S=${NETWORK_S:-$( ((DRY_RUN)) && echo 200 || echo 0)}
COLLAPSE_S=${COLLAPSE_S:-0}
PRETRAIN_SETTINGS=${PRETRAIN_SETTINGS:-authors,bf16,bf16+compile+graphs,bf16+compile,bf16+cudnn,bf16+math,fp32}
LOADER_WORKERS=${LOADER_WORKERS:-8,4}
COLLAPSE_SETTINGS=${COLLAPSE_SETTINGS:-authors_temp=--teacher_temp_end 0.07;default=}
BENCH_PRETRAIN_ARGS=${BENCH_PRETRAIN_ARGS:-}
export OUT REPO DRY_RUN PYTHONUNBUFFERED=1

stamp() { printf '\n==== %s  +%3d s  %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$SECONDS" "$*"; }

# Seconds a part may run: its own budget, capped by what is left of the session.
limit() {
    local left=$((SESSION_S - SECONDS - 3))
    if ((left < $1)); then echo "$((left > 0 ? left : 0))"; else echo "$1"; fi
}

# part NAME SECONDS COMMAND...: run COMMAND under timeout, with a stamp before and after.
part() {
    local name=$1 seconds=$2 rc
    shift 2
    if ((seconds < 10)); then
        stamp "$name: skipped, the session's $SESSION_S s are spent"
        return
    fi
    stamp "$name (limit $seconds s)"
    timeout -k 5 "$seconds" "$@"
    rc=$?
    if ((rc == 124 || rc == 137)); then
        stamp "$name: timed out after $seconds s"
    else
        stamp "$name: exit $rc"
    fi
}

session() {
    local commit
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    stamp "gpu_session start: repo $REPO, commit $commit, dry run $DRY_RUN"
    if command -v nvidia-smi >/dev/null; then
        timeout 20 nvidia-smi
        timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.max.mem \
            --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    echo "CPUs: $(nproc); memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2}') GiB"
    # A GPU machine without the project's dependencies (and no network): install wheels brought along in
    # bench_out/wheels (ignored by git; `pip download --no-deps --python-version X.Y ...` them beforehand).
    if [[ -d bench_out/wheels && $DRY_RUN != 1 ]]; then
        timeout 120 python -m pip install --quiet --no-deps --no-index --no-build-isolation bench_out/wheels/* \
            || echo "installing bench_out/wheels failed"
    fi
    timeout 60 python -c "import torch,nnunetv2,monai;print(torch.__version__, torch.cuda.is_available())"
    # The benchmarks must import this checkout. On the GPU machine (a fresh copy) install it where it is not what
    # imports (offline, no dependencies: console scripts for gpu_extra.sh); a dry run leaves the environment alone.
    local found
    found=$(cd / && timeout 60 python -c \
        "import nnunet_smit, pathlib; print(pathlib.Path(nnunet_smit.__file__).resolve().parents[1])" 2>/dev/null)
    if [[ $found != "$REPO" && $DRY_RUN != 1 ]]; then
        echo "nnunet_smit imports from '${found:-nowhere}', not $REPO: pip install --no-deps -e ."
        timeout 90 python -m pip install --quiet --no-deps --no-index --no-build-isolation -e . \
            || echo "pip install failed; the benchmarks import this checkout through PYTHONPATH"
    fi
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    (cd / && python -c "import nnunet_smit; print('nnunet_smit from', nnunet_smit.__file__)")

    local seconds
    seconds=$(limit "$PRETRAIN_S")
    if [[ $DRY_RUN == 1 ]]; then
        # shellcheck disable=SC2086  # BENCH_PRETRAIN_ARGS is a list of arguments
        part bench_pretrain "$seconds" python benchmarks/bench_pretrain.py --device cpu --steps 1 --warmup 1 \
            --small_heads --workers 0,2 --loader_batches 4 --profile 1 --budget_s $((seconds - 10)) \
            --json "$OUT/bench_pretrain.json" $BENCH_PRETRAIN_ARGS
    else
        # shellcheck disable=SC2086
        part bench_pretrain "$seconds" python benchmarks/bench_pretrain.py --device cuda --preset smit_small --view 96 \
            --batch 6 --steps 10 --warmup 3 --settings "$PRETRAIN_SETTINGS" --workers "$LOADER_WORKERS" \
            --child_timeout 220 --profile 2 --budget_s $((seconds - 10)) --json "$OUT/bench_pretrain.json" \
            $BENCH_PRETRAIN_ARGS
    fi

    seconds=$(limit "$NETWORK_S")
    if ((NETWORK_S <= 0)); then
        stamp "bench_network: not asked for (NETWORK_S=0)"
    elif [[ $DRY_RUN == 1 ]]; then
        part bench_network "$seconds" python benchmarks/bench_network.py --device cpu --dtype fp32 --patches 64 \
            --repeats 1 --networks smit plainconvunet --json "$OUT/bench_network.json"
    else
        part bench_network "$seconds" python benchmarks/bench_network.py --device cuda --dtype bf16 --patches 96 128 \
            --json "$OUT/bench_network.json"
    fi

    seconds=$(limit "$COLLAPSE_S")
    local collapse_settings=() setting
    IFS=';' read -ra settings <<<"$COLLAPSE_SETTINGS"
    for setting in "${settings[@]}"; do
        collapse_settings+=(--setting "$setting")
    done
    if ((COLLAPSE_S <= 0)); then
        stamp "bench_collapse: not asked for (COLLAPSE_S=0)"
    elif [[ $DRY_RUN == 1 ]]; then
        part bench_collapse "$seconds" python benchmarks/bench_collapse.py --device cpu --preset tiny --view 64 \
            --batch 2 --steps 4 --small_heads --phantoms 4 --samples_per_epoch 4 --log_every 1 --workers 0 --parallel \
            "${collapse_settings[@]}" --budget_s $((seconds - 20)) --json "$OUT/bench_collapse.json"
    else
        part bench_collapse "$seconds" python benchmarks/bench_collapse.py --device cuda --preset smit_small --view 96 \
            --batch 6 --steps 400 --phantoms 16 --samples_per_epoch 48 --log_every 10 --workers 4 --parallel \
            "${collapse_settings[@]}" --budget_s $((seconds - 20)) --json "$OUT/bench_collapse.json"
    fi

    if [[ -f benchmarks/gpu_extra.sh ]]; then
        seconds=$(limit "$SESSION_S")
        export EXTRA_LIMIT_S=$seconds
        part gpu_extra.sh "$seconds" bash -c 'source benchmarks/gpu_extra.sh'
    fi
    stamp "gpu_session end; in $OUT:"
    ls -l "$OUT"
}

session 2>&1 | tee "$OUT/gpu_session.txt"
