#!/usr/bin/env bash
# Every GPU measurement of issue 24, so that a session that is lent a GPU
# (an H100/H200) spends its minutes measuring. Each step has its own time
# limit; a step that fails or runs out is noted and the next one runs. The
# limits of the default steps add up to about 18 minutes, more than a
# session's device time: run them in the groups that docs/benchmarks.md
# ("Still to run on a GPU") lists, with STEPS. Tables and logs go to $OUT;
# summary.md gets one row per step, runs appended. The trained model is kept
# outside $OUT ($WORK, default /tmp/gpu-check-work), so a later run with
# STEPS finds it and no weights come back with the tables.
#
# On a GPU machine, from the repository root:
#     bash bench/gpu_check.sh
# A machine that lacks diffusers or mlxtend and reaches no package index gets
# them as wheels in .whl/ (installed first when the folder exists), made
# beforehand where pip works:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 mlxtend importlib_metadata lazy-importer
# Anywhere, to try every step with tiny sizes before spending device time:
#     SMOKE=1 OUT=/tmp/gpu-check bash bench/gpu_check.sh
# Only some steps (a rerun of those that failed): STEPS="pytest-gpu train" bash bench/gpu_check.sh
# ARCHIVE=FILE.tgz also packs the tables and logs (no weights, no images) into
# one file, for a remote runner that brings back only a few files (name it
# outside OUT, or give it before OUT: ARCHIVE="$OUT/gc.tgz" OUT=/tmp/gc).
#
# Steps (seconds are the limits, not estimates):
#   env         torch, CUDA, the card                                     10
#   pytest-gpu  the tests marked gpu                                       60
#   epoch-*     ms per epoch: official-style loop vs ours, alone and 3
#               rounds together (the challenge score is 1001 x 3 of them),
#               and the whole `score` command at 20 epochs               60 + 60
#   fidelity-*  A/B against the landed trainer, 10 rounds per arm, of rounds
#               together, rounds together in CUDA graphs and the compiled
#               network (bench/trainer_variants.py), at a noise that keeps
#               a GPU's budget mid-range                               90 + 120
#   train       `ddchallenge train mnist5k` (the preset; goal: < 120 s)   180
#   sampling    images/s of the three presets, CIFAR-100 training img/s    60
#   track2-*    prototypes of the trained model, then Track 2 d4m runs
#               at IPC 10 and auto; `invert` (d3m's vectors), then d3m
#               runs at IPC 10 and auto, each with the folder's default
#               300 matching steps (goal 3)           60 + 4 x 90 + 60
#   hlr         with EXTRAS=1 only (issue 23): `reference full mnist5k`, the
#               recipe on all 4,000 training digits (half a day on a
#               2-core CPU), cached for the pool step's HLR              150
#   pool        with EXTRAS=1 only (issue 23): the whole evaluation pool,
#               ResNet-18 included, with IOR against random real images
#               and HLR, official recipe, on mnist5k herding at IPC 10,
#               seed 10 (the herding set first: 60)                 60 + 150
#   ipc50       with IPC50=MODEL only (issue 20): the IPC-50 rows of
#               bench/track2_protocol.py (random real images and each
#               method's validated choice: d4m on its fitted table,
#               diffusion at guidance 1, d3m, all with matching; scoring
#               seeds 10 and 20, official recipe: eight scores) from MODEL,
#               a copy of the validation generator's newest checkpoint
#               carried with the tree (about 18 h of one CPU core)       400
#   profile-*   with PROFILE=1 only: bench/gpu_profile.py, ms/epoch of the
#               landed trainer against the variants (the new pool-reshape,
#               channels-last and bf16 among them), and the top kernels of
#               a pass (first measured in session 11)                 120 + 120
# The full official protocol of both shapes (`bench/evaluator_speed.py
# --full`, ~340 s when last measured) is left out: it alone would take most
# of the time; the epoch rows give it as 3 x 1001 round-epochs.
set -uo pipefail
OUT=${OUT:-gpu-check}
WORK=${WORK:-/tmp/gpu-check-work}
MODEL="$WORK/mnist5k-model"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
{ echo; echo "run of $(date -u '+%Y-%m-%d %H:%M UTC'), STEPS=${STEPS:-all}${SMOKE:+, SMOKE}"; echo
  echo "| step | seconds | status |"; echo "|---|---|---|"; } >>"$OUT/summary.md"
# The bench scripts and the scorer's sandboxed child import the installed package (the child starts from an empty
# folder): install this tree, offline, where wheels were carried in .whl/ (a GPU runner's machine, which may hold
# an earlier copy of the tree from a previous call) or where the package is not importable.
if compgen -G ".whl/*.whl" >/dev/null || ! (cd / && $PY -c "import ddchallenge") 2>/dev/null; then
    { ! compgen -G ".whl/*.whl" >/dev/null || $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl; } &&
        $PY -m pip install -q --no-index --no-deps --no-build-isolation --force-reinstall . ||
        { echo "| install | | failed: this tree or .whl/ could not be installed (pip install --no-deps) |" \
              >>"$OUT/summary.md"; exit 1; }
fi
if [ -n "${SMOKE:-}" ]; then  # tiny sizes: checks that every step runs, measures nothing
    E1=1 E2=0 R=2 FE=1 FR=2 SCALE=10 DEV="--device cpu" NOISE_CIFAR=6 NOISE_TINY=4 TRAIN="--preset tiny --steps 2 --checkpoint-every 2" INVERT="--steps 2" MATCH="--match-steps 2" GEN="--repeats 1 --batch 4 --train-steps 1"
else
    # Noise for the A/B sets at 21 and 7 passes: 48.75 % and 58.10 % in one round on the 2-core CPU
    # (session 11); fidelity.py's CPU defaults (6 and 4) saturated on the H100 (99.2 % and 100 %).
    E1=20 E2=5 R=3 FE=20 FR=10 SCALE=1 DEV="" NOISE_CIFAR=12 NOISE_TINY=20 TRAIN="" INVERT="" MATCH="" GEN="--repeats 3 --batch 500 --train-steps 10"
fi

selected() {  # selected NAME...: whether STEPS (all when unset) names any of them
    [ -z "${STEPS:-}" ] && return 0
    local name
    for name; do [[ " $STEPS " == *" $name "* ]] && return 0; done
    return 1
}

STATUS=ok
timed() {  # timed NAME LIMIT COMMAND...: stdout to NAME.md, stderr to NAME.log, seconds and status to summary.md
    local name=$1 limit=$(($2 * SCALE))  # a CPU is far slower: the smoke run only checks that each step works
    shift 2
    local begin=$SECONDS
    # -k: a command that outlives SIGTERM (its cleanup, compile workers) is killed 15 s later
    timeout -k 15 "$limit" "$@" >"$OUT/$name.md" 2> >(tr '\r' '\n' >"$OUT/$name.log")
    local rc=$?
    STATUS=ok
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && STATUS="stopped at its ${limit} s limit"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && STATUS="failed (exit $rc; see $name.log)"
    echo "| $name | $((SECONDS - begin)) s | $STATUS |" | tee -a "$OUT/summary.md"
}

step() {  # step NAME LIMIT COMMAND...: timed, when STEPS names it
    selected "$1" && timed "$@"
}

skipped() {  # skipped NAME WHY: a summary row for a selected step that cannot run
    selected "$1" && echo "| $1 | 0 s | skipped: $2 |" | tee -a "$OUT/summary.md"
    return 0
}

has_table() {  # has_table NAME: the model's newest checkpoint stores that table
    local newest
    newest=$(ls -d "$MODEL"/step-* 2>/dev/null | sort | tail -1)
    [ -n "$newest" ] && [ -e "$newest/codebooks/$1.safetensors" ]
}

step env 10 $PY -c "import torch, platform; print(torch.__version__, torch.version.cuda, platform.python_version());
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
step pytest-gpu 60 $PY -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/test_*.py)
step epoch-cifar100 60 $PY bench/evaluator_speed.py --shape cifar100 --epochs $E1 --repeats 3 --rounds $R --whole
step epoch-tinyimagenet 60 $PY bench/evaluator_speed.py --shape tinyimagenet --epochs $E2 --repeats 3 --rounds $R
ARMS="together rounds-graph compiled"
step fidelity-cifar100 90 $PY bench/fidelity.py --shape cifar100 --epochs $FE --rounds $FR --group $FR --arms $ARMS \
    --noise $NOISE_CIFAR $DEV
step fidelity-tinyimagenet 120 $PY bench/fidelity.py --shape tinyimagenet --epochs $((FE / 4 + 1)) --rounds $FR \
    --group $((FR / 2)) --arms $ARMS --noise $NOISE_TINY $DEV
MODEL_OK=yes
if selected train; then
    rm -rf "$MODEL"
    timed train 180 $PY -m ddchallenge train mnist5k -o "$MODEL" --quiet $TRAIN
    [ "$STATUS" = ok ] || MODEL_OK="train did not finish ($STATUS): its checkpoints are not the preset's model"
fi
[ -d "$MODEL" ] || MODEL_OK="no model in $MODEL (run the train step first)"
step sampling 60 $PY bench/generation_speed.py $GEN
# Goal 3: Track 2 d4m and d3m runs at IPC 10 and auto from the model just
# trained, as the scorer runs them (seconds per phase in track2-*.log). A
# folder's tables count together under the table rule: each method's run
# drops the other's table first.
track2() {  # track2 METHOD IPC
    step "track2-$1-$2" 90 $PY -m ddchallenge generate --track 2 --model "$MODEL" --dataset mnist5k \
        --ipc "$2" --seed 10 -o "$OUT/track2-$1-$2.h5" --force
}
D4M="track2-d4m-10 track2-d4m-auto" D3M="invert track2-d3m-10 track2-d3m-auto"
if [ "$MODEL_OK" != yes ]; then
    for name in $D4M $D3M; do skipped "$name" "$MODEL_OK"; done
else
    if selected $D4M; then
        has_table d3m-k10 && timed drop-d3m-table 30 $PY -m ddchallenge settings "$MODEL" --drop-table d3m-k10
        timed prototypes 60 $PY -m ddchallenge prototypes "$MODEL" --ipc 10 --make-default $MATCH --quiet
        track2 d4m 10
        track2 d4m auto
    fi
    if selected $D3M; then
        has_table d4m-ipc10 && timed drop-d4m-table 30 $PY -m ddchallenge settings "$MODEL" --drop-table d4m-ipc10
        step invert 60 $PY -m ddchallenge invert "$MODEL" --per-class 10 --make-default --quiet $INVERT $MATCH
        track2 d3m 10
        track2 d3m auto
    fi
fi
if [ -n "${EXTRAS:-}" ]; then
    selected pool && timed herding 60 $PY -m ddchallenge generate --dataset mnist5k --method herding --ipc 10 --seed 10 \
        -o "$OUT/herding.h5" --force --quiet
    step hlr 150 $PY -m ddchallenge reference full mnist5k --seed 10 --quiet \
        $([ -n "${SMOKE:-}" ] && echo "--epochs 1 --rounds 2")
    step pool 150 $PY -m ddchallenge score "$OUT/herding.h5" --dataset mnist5k --seed 10 --arch pool --baseline random \
        --baseline-seed 10 --output "$OUT/records" --json "$OUT/pool.json" --quiet \
        $([ -n "${SMOKE:-}" ] && echo "--epochs 1 --rounds 2")
fi
if [ -n "${IPC50:-}" ]; then
    step ipc50 400 $PY bench/track2_protocol.py --model "$IPC50" --out "$OUT/t2p" --dataset mnist5k --seeds 10 20 \
        --ipc 50 --runs random d4m-fit1000-m300-s30 diffusion-m300-g1 d3m-m300 \
        $([ -n "${SMOKE:-}" ] && echo "--epochs 1 --rounds 1")
fi
if [ -n "${PROFILE:-}" ]; then
    step profile-tinyimagenet 120 $PY bench/gpu_profile.py --shape tinyimagenet --epochs $((E2 + 1)) --repeats 3 $DEV
    step profile-cifar100 120 $PY bench/gpu_profile.py --shape cifar100 --epochs $E1 --repeats 3 $DEV
fi
if [ -n "${ARCHIVE:-}" ]; then
    tar czf "$ARCHIVE" -C "$OUT" --exclude='*.h5' --exclude=records --exclude="$(basename "$ARCHIVE")" . &&
        echo "packed into $ARCHIVE"
fi
echo "tables: $OUT/*.md; logs: $OUT/*.log"
