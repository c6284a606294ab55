#!/usr/bin/env bash
# Everything here that needs a CUDA GPU, as one call on a lent GPU machine (~5 minutes):
# the xformers/CUDA tests, `bench model` on CUDA (xformers against SDPA in one process),
# and bf16 training of the tiny preset from carried conversations. It needs only
# PyTorch there: the xformers wheel travels in .whl, the conversations in .gpu/cache
# (training from a full cache imports neither PyAV nor espeak-ng; tests/test_train.py).
#
# Prepared here, once (~1 minute; .whl ~3 MB, .gpu ~13 MB, the repository ~26 MB):
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl xformers==0.0.35
#   name=$(.venv/bin/python -c 'from model.train import CACHE_NAME; print(CACHE_NAME)')  # data version's cache
#   mkdir -p .gpu/cache/$name && cp .cache/conversations/$name/290{00..39}.pt .gpu/cache/$name/
# Then: device run, command "bash bench/gpu_check.sh", carry [".whl", ".gpu"], timeout_s 540.
# Results land in $OUT (a plain run here writes them to /tmp/gpu_check; with no GPU the
# CUDA tests skip and the rest runs on the CPU, which checks the plumbing: tests/test_train.py
# runs it so, smaller, through CACHE, CONVERSATIONS, REPEATS and TRAIN_STEPS).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PYTHON" -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1; } | tee "$OUT/versions.txt"

step() { echo "== $1 ($(date +%T))"; }
status=0

# The repository's conftest starts servers (aiortc, starlette: not there); these tests need none.
step "CUDA and xformers tests"
"$PYTHON" -m pytest --noconftest -q -rs -p no:cacheprovider tests/test_attention_backends.py 2>&1 \
    | tee "$OUT/tests.log" || status=1

step "bench model on $DEVICE"
"$PYTHON" -m bench.model --json --repeats "${REPEATS:-15}" --device "$DEVICE" > "$OUT/bench_model.json" || status=1
cat "$OUT/bench_model.json"

# bf16 autocast on CUDA; the same batches on the CPU for the plumbing. 40 conversations
# are enough to read throughput and see the loss fall; they are not a training set.
step "train tiny on $DEVICE (${TRAIN_STEPS:=300} steps)"
"$PYTHON" -m model.train --out "$OUT/train" --cache "${CACHE:-.gpu/cache}" --conversations "${CONVERSATIONS:-40}" \
    --first-seed 29000 --steps "$TRAIN_STEPS" --batch 16 --turns 80 --warmup 20 --save-every "$TRAIN_STEPS" --seed 0 2>&1 \
    | tr '\r' '\n' > "$OUT/train.log" || status=1
grep "step " "$OUT/train.log" | awk 'NR == 1 || NR % 50 == 0'; tail -1 "$OUT/train.log"
rm -rf "$OUT/train"  # a throughput check's weights: not worth bringing back
step "done: status $status"
exit $status
