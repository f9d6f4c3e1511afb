#!/usr/bin/env bash
# Every GPU measurement benchmarks/RESULTS.md "GPU" still owes, as stages of one script, so that time on a GPU
# machine goes to measuring rather than typing commands.
#
#   bash benchmarks/gpu_session.sh [STAGE ...]            # in the repository root on the GPU machine
#   DEVICE=cpu bash benchmarks/gpu_session.sh quick all   # smoke test of the script itself, anywhere (small sizes)
#
# Stages, in this order by default (`all`): env tests speed profile doctor bench accuracy train examples. Split
# long runs over several invocations, e.g. `env tests speed profile doctor bench` then `accuracy train examples`.
# `quick` (a first argument) shrinks every stage to smoke size.
#
# Environment: OUT (default ./gpu-session): where the files go — session.log (every stage's output, appended),
# gpu_speed.json, step_profile.json, bench.json, accuracy.png, train_gpt.png, train_gpt.json.
# PYTHON (default python3: an interpreter that holds torch with CUDA, triton, tqdm, matplotlib and pytest).
# DION: a directory holding microsoft/dion's `dion` package, to time beside orthoptim (benchmarks/gpu_speed.py
# --dion-path; never committed), e.g. a checkout's `dion/` copied to an ignored `.dion/`, then
# `DION=.dion bash benchmarks/gpu_session.sh env tests speed`. DEVICE (default cuda). orthoptim runs from src/
# (PYTHONPATH): nothing is installed.
set -u -o pipefail

PY=${PYTHON:-python3}
OUT=${OUT:-gpu-session}
DEVICE=${DEVICE:-cuda}
QUICK=0
if [ "${1:-}" = quick ]; then
    QUICK=1
    shift
fi
STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ] || [ "${STAGES[0]}" = all ]; then
    STAGES=(env tests speed profile doctor bench accuracy train examples)
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
LOG="$OUT/session.log"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FAILED=0

run() {  # run NAME CMD...: the command's output appended to session.log, a one-line summary on stdout
    local name=$1 start rc
    shift
    start=$(date +%s)
    printf '\n===== %s (%s UTC): %s\n' "$name" "$(date -u +%H:%M:%S)" "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
    rc=$?
    printf '===== %s: exit %d after %d s\n' "$name" "$rc" "$(($(date +%s) - start))" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || FAILED=1
}

pick() {  # pick FULL QUICK: the argument string for this mode
    if [ "$QUICK" = 1 ]; then echo "$2"; else echo "$1"; fi
}

for stage in "${STAGES[@]}"; do
    case $stage in
    env)
        run env bash -c "date -u; (nvidia-smi -L || true); $PY -c 'import sys, torch; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\"); \
import importlib.util as u; print(\"triton\", u.find_spec(\"triton\") is not None)'; git log -1 --oneline || true"
        ;;
    tests)  # tests/test_cuda.py alone first (compiled kernels, no-sync, CUDA-graph capture), then the whole suite
        run tests-cuda "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
        run tests "$PY" -m pytest -q -x -p no:cacheprovider $(pick "" "tests/test_kernels.py tests/test_launches.py")
        ;;
    speed)
        dion=()
        if [ -n "${DION:-}" ]; then dion=(--dion-path "$DION"); fi
        # shellcheck disable=SC2046
        run speed "$PY" benchmarks/gpu_speed.py --device "$DEVICE" --json "$OUT/gpu_speed.json" "${dion[@]}" \
            $(pick "" "--quick --repeats 1 --warmup 0")
        ;;
    profile)  # where the step's time goes: kernels by kind, device-busy vs wall (benchmarks/step_profile.py)
        # shellcheck disable=SC2046
        run profile "$PY" benchmarks/step_profile.py --device "$DEVICE" --json "$OUT/step_profile.json" \
            $(pick "" "--layers 1 --steps 1 --top 3")
        ;;
    doctor)
        # shellcheck disable=SC2046
        run doctor "$PY" -m orthoptim doctor --device "$DEVICE" --no-progress $(pick "" "--shapes 64x64 --repeats 1")
        ;;
    bench)  # the installed command users run: `orthoptim bench` (GPT-2 small's step vs torch.optim.Muon)
        # shellcheck disable=SC2046
        run bench "$PY" -m orthoptim bench --device "$DEVICE" --no-progress --json "$OUT/bench.json" \
            $(pick "--repeats 20" "--shapes 64x64 --repeats 1 --warmup 0")
        ;;
    accuracy)
        # shellcheck disable=SC2046
        run accuracy "$PY" benchmarks/accuracy.py --device "$DEVICE" --out "$OUT/accuracy.png" \
            $(pick "" "--size 128 --steps 5 --spectra harmonic --schedules jordan")
        ;;
    train)
        # shellcheck disable=SC2046
        run train "$PY" benchmarks/train_gpt.py --device "$DEVICE" --out "$WORK/train" \
            $(pick "" "--steps 10 --layers 1 --width 32 --heads 2 --context 32 --batch 4")
        cp "$WORK/train/demo.png" "$OUT/train_gpt.png" 2>/dev/null || true
        cp "$WORK/train/results.json" "$OUT/train_gpt.json" 2>/dev/null || true
        ;;
    examples)  # one rank per GPU: one rank here (NCCL on a GPU, gloo elsewhere); a checkpoint round trip
        steps=$(pick 30 3)
        run ddp "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 examples/ddp_train.py --steps "$steps"
        run fsdp2 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 examples/fsdp2_train.py \
            --steps "$steps" --ckpt "$WORK/ckpt"
        run fsdp2-resume "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 examples/fsdp2_train.py \
            --steps "$steps" --resume "$WORK/ckpt"
        ;;
    *)
        echo "unknown stage '$stage'; stages: env tests speed profile doctor bench accuracy train examples (or all)" >&2
        exit 2
        ;;
    esac
done
echo "files in $OUT:"
ls -l "$OUT"
exit "$FAILED"
