#!/usr/bin/env bash
# The GPU check (issue 19), in one go on a GPU machine, at most about 8 minutes; every result as files in OUT.
#
#   bash benchmarks/gpu_check.sh [--device cuda] [--preset llama-3.2-1b] [--vae sd] [--image-size 256x256]
#                                [--out DIR]
#
# 1. builds the synthetic checkpoint of the preset (benchmarks/make_checkpoint.py: random weights, real shapes);
# 2. runs the CUDA-marked tests (tests/gpu: the Triton kernels compiled vs torch, the CUDA-graph decode step vs
#    eager, the compiled denoising step vs eager, bfloat16 text vs transformers in bfloat16) -> tests.xml;
# 3. benchmarks the checkpoint in bfloat16 (benchmarks/bench_engine.py): decode tok/s at 1, 16 and 64 requests
#    with the fraction of HBM bandwidth a step achieves, time to first token, images/s at 1 and 8 requests
#    (28 steps) vs the naive sampler, peak GPU memory -> bench.json;
# 4. writes summary.json: each step's exit status and seconds. Exits non-zero if a step failed.
#
# The machine needs torch (CUDA), triton, transformers and pytest; what else the project needs travels as
# wheels in .whl/ (`make gpu-wheels`, benchmarks/gpu_wheels.txt; with the 1B-class tokenizer), installed here
# into a scratch folder. The
# project runs from this tree, uninstalled. Its CPU dry run, `--device cpu --preset tiny`, runs in the test
# suite (tests/gpu/test_gpu_check.py) with small sizes, so that this script cannot rot between GPU sessions.
set -uo pipefail

DEVICE=cuda PRESET=llama-3.2-1b VAE=sd SIZE=256x256 OUT=${OUT:-gpu-check}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --preset) PRESET=$2; shift 2 ;;
    --vae) VAE=$2; shift 2 ;;
    --image-size) SIZE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

# The carried wheels, where the packages are missing (a stock GPU image), not over those installed.
if ! "$PY" -c "import diffusers, fastapi, pydantic, uvicorn, multipart" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl || exit 1
  export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$ROOT:$ROOT/kernels:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# torch.compile's cache of its own: a step stopped at its limit mid-compile leaves a truncated kernel behind,
# which would break every later compile that shares the cache.
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
if [ "$DEVICE" = cpu ]; then  # the dry run: the same steps, sizes that take seconds, limits for a busy CPU
  export TRITON_INTERPRET=1
  BENCH=(--dtype bfloat16 --attention-backend torch --tokens 8 --steps 2 --chat 1,4 --images 1,2 --repeats 1)
  LIMITS=(600 600 600)
else
  export TRITON_INTERPRET=0
  # the GPU image's settings: the Triton kernels (SDPA would gather the CUDA graphs' whole-context tables)
  BENCH=(--dtype bfloat16 --attention-backend triton --tokens 64 --steps 28 --chat 1,16,64 --images 1,8 --repeats 2)
  LIMITS=(120 150 210)  # seconds for the checkpoint, the tests, the benchmark: 8 minutes at the very most
fi

declare -A STATUS SECONDS_TAKEN
step() {  # step NAME LIMIT_S COMMAND...: runs it with a time limit, output to OUT/NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  STATUS[$name]=${PIPESTATUS[0]}
  SECONDS_TAKEN[$name]=$((SECONDS - start))
  echo "== $name: exit ${STATUS[$name]} in ${SECONDS_TAKEN[$name]} s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1 || true
# The tokenizer of the preset's vocabulary, trained once (a minute for 128k tokens): `make gpu-wheels` puts the
# 1B-class one in .whl/tokenizers; without it, it is trained here.
step checkpoint "${LIMITS[0]}" "$PY" benchmarks/make_checkpoint.py --preset "$PRESET" --vae "$VAE" --image-size "$SIZE" \
  --out "$WORK/checkpoint" --tokenizer-cache "$([ -d .whl/tokenizers ] && echo .whl/tokenizers || echo "$WORK/tokenizers")"
step tests "${LIMITS[1]}" env XFUSION_TEST_DEVICE="$DEVICE" "$PY" -m pytest tests/gpu/test_cuda.py -m cuda -q \
  -p no:cacheprovider --junitxml "$OUT/tests.xml"
if [ "${STATUS[checkpoint]}" = 0 ]; then
  step bench "${LIMITS[2]}" "$PY" benchmarks/bench_engine.py --checkpoint "$WORK/checkpoint" --device "$DEVICE" \
    --baselines-up-to 1 "${BENCH[@]}" --json "$OUT/bench.json"
else
  STATUS[bench]=skipped SECONDS_TAKEN[bench]=0
fi

failed=0
{
  echo "{\"device\": \"$DEVICE\", \"preset\": \"$PRESET\", \"vae\": \"$VAE\", \"image_size\": \"$SIZE\","
  sep=""
  for name in checkpoint tests bench; do
    echo "$sep \"$name\": {\"exit\": \"${STATUS[$name]}\", \"seconds\": ${SECONDS_TAKEN[$name]}}"
    sep=","
    [ "${STATUS[$name]}" = 0 ] || failed=1
  done
  echo "}"
} >"$OUT/summary.json"
cat "$OUT/summary.json"
exit $failed
