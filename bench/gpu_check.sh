#!/usr/bin/env bash
# Everything here that needs a CUDA GPU, as one call on a lent GPU machine (~9 minutes):
#   1. drills, then conversations, generated there on its CPU cores for DATA_MINUTES,
#      in the background all along (session 31: ~13 conversations/s on 14; 1.7x that a core
#      since session 34 made the room convolution FFT, docs/benchmarks.md);
#   2. meanwhile the xformers/CUDA tests and `bench model` on CUDA (xformers against SDPA);
#   3. from TRAIN_AFTER seconds, the runs in PRESETS (default `small`; "tiny small" trains
#      both side by side for a same-data, same-minutes comparison, as session 31 did)
#      trained for TRAIN_MINUTES, bf16 autocast, taking in the conversations made meanwhile
#      (--follow-cache), so the data grows while the GPU trains. A run is a preset and,
#      after `+`, `microturn train` switches of its own: "tiny tiny+no-own-voice" trains
#      tiny with and without hearing its own voice (back as tiny and tiny_no-own-voice),
#      "small+render-history" on the voice its audio head renders. A preset whose checkpoint
#      is carried in INIT (INIT/small/, say) continues from those weights (--init, a
#      fresh schedule at LR, default half the from-scratch rate), every run of it, switches
#      and all; the others start anew. What comes back must fit a call's 64 MiB: two
#      `small` (~40 MiB each in bf16) do not, and the script says so before starting;
#   4. the checkpoints packed as bf16 in tar parts of at most 15 MiB for the trip back,
#      the logs in logs.tar (at most 5 files: a call brings back 8, 64 MiB in all).
# The machine has PyTorch, numpy and safetensors but not PyAV, espeak-ng or xformers:
# espeak-ng and xformers travel as wheels in .whl. PyAV need not: without it the
# conversations are resampled in numpy (MICROTURN_RESAMPLER=sinc, model/audio.py), which
# leaves room in the 64 MiB a call may carry for a checkpoint to continue (`small` in
# bf16: 44 MB). The shipped weights stay behind (nothing here needs them).
#
# Prepared here, once (~1 minute; .whl ~13 MB):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl xformers==0.0.35 espeakng-loader==0.2.4
#   mv checkpoints/tiny/model.safetensors /tmp/   # for the call only; put it back after
#   echo /.carry/ >> .git/info/exclude; mkdir -p .carry && cp -r LAST_RUN/small .carry/   # to continue one
# Then: device run, command "INIT=.carry FIRST_SEED=N bash bench/gpu_check.sh" (N: seeds no run
# has trained on; docs/training.md, "On a lent GPU", lists those taken), carry [".whl", ".carry"],
# timeout_s 570.
# Back here: cat small.tar.* | tar x -C DIR, then `microturn eval --checkpoint DIR/small`.
# The numbers of each such run, and their commands: docs/training.md, "On a lent GPU".
# Results land in $OUT (a plain run here writes them to /tmp/gpu_check; with no GPU the
# CUDA tests skip and the rest runs on the CPU, which checks the plumbing: tests/test_train.py
# runs it so, in seconds, through the upper-case settings below).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
WORK=${WORK:-/tmp/gpu_work}  # the cache and the checkpoints at full size: not brought back
mkdir -p "$OUT" "$WORK"
PYTHON=${PYTHON:-python3}
DATA_MINUTES=${DATA_MINUTES:-6.5} WORKERS=${WORKERS:-13} DRILLS=${DRILLS:-300} TRAIN_AFTER=${TRAIN_AFTER:-130}
TRAIN_MINUTES=${TRAIN_MINUTES:-5.5} BATCH=${BATCH:-32} REPEATS=${REPEATS:-15} PRESETS=${PRESETS:-small}
# Seeds no run has trained on (docs/training.md, "On a lent GPU", lists those taken: move these on after each call).
FIRST_SEED=${FIRST_SEED:-42000} FIRST_DRILL=${FIRST_DRILL:-4700}
INIT=${INIT:-} LR=${LR:-} CHECKS=${CHECKS:-1}  # CHECKS=0: no CUDA tests or bench, all the time to training
case "$CHECKS" in 0 | 1) ;; *) echo "CHECKS=$CHECKS: 0 or 1" >&2; exit 2 ;; esac
# Before session 41 a switch for every run; now a run's own, so an old command line fails loudly.
[ -z "${RENDER_HISTORY:-}" ] || { echo "RENDER_HISTORY is gone: name the run small+render-history" >&2; exit 2; }
# A run "small+no-own-voice+text-lead=1": its preset, its switches (--no-own-voice --text-lead=1),
# and the name its checkpoint and log come back under (small_no-own-voice_text-lead-1).
run_preset() { echo "${1%%+*}"; }
run_name() { local name=${1//+/_}; echo "${name//=/-}"; }
run_switches() { [ "$1" = "${1%%+*}" ] || (IFS=+; printf -- '--%s\n' ${1#*+}); }  # one per line
# How a run starts: from INIT's checkpoint of its preset where one was carried, else anew.
run_start() {
    local preset; preset=$(run_preset "$1")
    if [ -n "$INIT" ] && [ -f "$INIT/$preset/model.safetensors" ]; then printf -- '--init\n%s\n' "$INIT/$preset"
    else printf -- '--preset\n%s\n' "$preset"; fi
}
# What every run trains with (its start, rate and switches besides).
fixed=(--cache "$WORK/cache" --follow-cache --conversations 100000 --first-seed "$FIRST_SEED" --drills "$DRILLS"
       --first-drill "$FIRST_DRILL" --steps 1000000 --minutes "$TRAIN_MINUTES" --batch "$BATCH" --turns 80
       --warmup 100 --save-every 1000000 --seed 0 --listen-weight 0.25 --text-weight 3 --speech-weight 2)
if [ -n "$INIT" ]; then  # a lease is too short to find out from a log that nothing was continued
    carried=0
    for run in $PRESETS; do [ -f "$INIT/$(run_preset "$run")/model.safetensors" ] && carried=1; done
    [ "$carried" = 1 ] || { echo "INIT=$INIT holds none of $PRESETS (INIT/PRESET/model.safetensors)" >&2; exit 2; }
fi
started=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=${WHEELS:-.whl} SITE=${SITE:-/tmp/site}  # the carried wheels, and where they are unpacked
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$SITE"
fi
DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
# Each run checked before the lease is spent on it: a misspelt switch, switches that do
# not go together (the model is built as the run will build it), a run named twice, or
# more checkpoint than a call brings back (64 MiB in all; the logs need some).
names=" " bring_back=0
for run in $PRESETS; do
    case "$names" in *" $(run_name "$run") "*) echo "PRESETS names $run twice" >&2; exit 2 ;; esac
    case "+${run#*+}+" in *++*) echo "PRESETS: $run has an empty switch" >&2; exit 2 ;; esac
    names+="$(run_name "$run") "
    mapfile -t start < <(run_start "$run")
    bytes=$("$PYTHON" -c 'import sys
from model.train import build_model, build_parser
try:
    model, _, _ = build_model(build_parser().parse_args(sys.argv[2:]))
except ValueError as refused:
    sys.exit(f"PRESETS: {sys.argv[1]}: {refused}")
print(2 * sum(t.numel() for t in model.state_dict().values()))  # bf16
' "$run" --out "$WORK/check" "${start[@]}" "${fixed[@]}" $(run_switches "$run")) || exit 2
    bring_back=$((bring_back + bytes))
done
if [ "$bring_back" -gt $((60 * 1024 * 1024)) ]; then
    echo "PRESETS=\"$PRESETS\" would bring back $((bring_back / 1048576)) MiB of weights; a call brings back 64 MiB" >&2
    exit 2
fi
"$PYTHON" -c "import av" 2> /dev/null || export MICROTURN_RESAMPLER=sinc  # no PyAV carried: numpy resamples
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  nproc
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PYTHON" -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1
  "$PYTHON" -c "import av; print('av', av.__version__)" 2>&1 | tail -1
  echo "resampler ${MICROTURN_RESAMPLER:-av}"; } | tee "$OUT/versions.txt"

step() { echo "== $1 ($(date +%T))"; }
status=0

# Made all along, on the CPU cores the training leaves idle: the drills first (few,
# and the training reads them all at its start; ~30 s, well inside TRAIN_AFTER), then
# conversations until the deadline.
step "data: $DRILLS drills, then conversations from seed $FIRST_SEED for $DATA_MINUTES min on $WORKERS processes"
common=(--cache "$WORK/cache" --first-drill "$FIRST_DRILL" --workers "$WORKERS" --steps 0)
{ "$PYTHON" -m model.train --out "$WORK/data" "${common[@]}" --conversations 0 --drills "$DRILLS" \
  && "$PYTHON" -m model.train --out "$WORK/data" "${common[@]}" --conversations 100000 \
         --first-seed "$FIRST_SEED" --data-minutes "$DATA_MINUTES"; } > "$OUT/data.log" 2>&1 &
data=$!

if [ "$CHECKS" = 1 ]; then
    # The repository's conftest starts servers (aiortc, starlette: not there); these tests need none.
    step "CUDA and xformers tests"
    timeout 120 "$PYTHON" -m pytest --noconftest -q -rs -p no:cacheprovider tests/test_attention_backends.py 2>&1 \
        | tee "$OUT/tests.log" || status=1

    step "bench model on $DEVICE (the data generation shares the CPU)"
    timeout 150 "$PYTHON" -m bench.model --json --repeats "$REPEATS" --device "$DEVICE" > "$OUT/bench_model.json" \
        || status=1
    cat "$OUT/bench_model.json"
fi

wait_s=$((TRAIN_AFTER - (SECONDS - started)))
[ "$wait_s" -gt 0 ] && sleep "$wait_s"
# Each run takes the conversations cached so far and, every 50 steps, those made since
# (--follow-cache); the drills are all there by now (else it makes what is missing).
step "train ${PRESETS// /, } for $TRAIN_MINUTES min each, side by side, following the data"
trainers=()
for run in $PRESETS; do
    preset=$(run_preset "$run") name=$(run_name "$run")
    mapfile -t start < <(run_start "$run")
    # The wider model at half tiny's rate; a continued one at half its from-scratch rate.
    lr=2e-3 continued_lr=1e-3; [ "$preset" = tiny ] || lr=1e-3 continued_lr=5e-4
    [ "${start[0]}" = --init ] && lr=$continued_lr
    lr=${LR:-$lr}
    # In a subshell: $! is then the pipeline's status under pipefail, not tr's.
    ( "$PYTHON" -m model.train --out "$WORK/$name" "${start[@]}" "${fixed[@]}" --lr "$lr" \
        $(run_switches "$run") 2>&1 | tr '\r' '\n' > "$OUT/train-$name.log" ) &
    trainers+=($!)
done
for pid in "${trainers[@]}" "$data"; do wait "$pid" || status=1; done
cat "$OUT/data.log"
for run in $PRESETS; do
    name=$(run_name "$run")
    echo "-- $run"; grep "model:\|step \|data:" "$OUT/train-$name.log" | awk 'NR <= 2 || NR % 20 == 0'
    tail -1 "$OUT/train-$name.log"
done

step "pack the checkpoints as bf16 (loaded back as float32 by load_checkpoint)"
for run in $PRESETS; do
    name=$(run_name "$run")
    "$PYTHON" -c "import sys, torch; from model.weights import load_checkpoint, save_checkpoint
save_checkpoint(load_checkpoint(sys.argv[1]), sys.argv[1], torch.bfloat16)" "$WORK/$name" || status=1
    packed=("$name/model.safetensors" "$name/config.json")  # and how it decodes, where training wrote it
    for file in decoding.json lexicon.txt; do [ -f "$WORK/$name/$file" ] && packed+=("$name/$file"); done
    tar -C "$WORK" -c "${packed[@]}" | split -b 15M -d - "$OUT/$name.tar." || status=1
done
# A call brings back at most 8 files: the logs go as one.
logs=()  # CHECKS=0 writes no tests.log or bench_model.json
for log in "$OUT"/{versions.txt,tests.log,bench_model.json,data.log} "$OUT"/train-*.log; do
    [ -f "$log" ] && logs+=("$(basename "$log")")
done
(cd "$OUT" && tar -cf logs.tar "${logs[@]}" && rm "${logs[@]}") || status=1
ls -l "$OUT"
step "done: status $status"
exit $status
