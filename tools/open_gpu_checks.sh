#!/bin/bash
# The GPU runs that decide what is still open in issue 9, in order of what they decide:
#   1. the pool-view tests (decode.POOL_VIEWS may be turned on only once they pass on a GPU);
#   2. whole pools against views, timed in turn with cuDNN (does ending fewer CUDA graphs pay?);
#   3. the queue experiment (tools/queue_probe.py: does handing out splits close the tail?);
#   4. each threadblock's clock with views over 200 chained calls (is the idle between calls gone?);
#   5. `pagedkv bench gather --full` with views on (every cell of section 3 of docs/benchmarks.md);
#   6. a Llama-3-8B-shaped decode step, views against whole pools, also with 16x the blocks
#      (tools/step_split.py: the model-level A/B; a large pool ends graphs most often).
# Run on a CUDA GPU with MLX's CUDA build (`../shared/gpu/README.md` for the lent machine):
#     bash tools/open_gpu_checks.sh [OUT_DIR]      (default gpu-results/, git-ignored; about 10 minutes on an H100)
# Everything goes to OUT_DIR/log.txt (each step's command, output, exit status and seconds; a step
# that fails does not stop the next) and the gather table to OUT_DIR/gather.csv and gather.png.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."  # the repository root: the test paths are relative to it
log="$out/log.txt"
export PYTHONUNBUFFERED=1 MLX_ENABLE_TF32=${MLX_ENABLE_TF32:-0}
{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat .rev 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import mlx.core as mx; print('MLX', mx.__version__, mx.default_device())"
} >>"$log" 2>&1

step() {  # step NAME SECONDS COMMAND...: appended to the log; its last lines printed
  local name=$1 limit=$2 start rc
  shift 2
  echo "## $name: $*" >>"$log"
  start=$(date +%s)
  timeout "$limit" "$@" >"/tmp/open-gpu-$name.txt" 2>&1
  rc=$?
  cat "/tmp/open-gpu-$name.txt" >>"$log"
  echo "## $name: exit $rc in $(($(date +%s) - start)) s" | tee -a "$log"
  tail -n 12 "/tmp/open-gpu-$name.txt"
}

step views_tests 150 python -m pytest -q -x -p no:cacheprovider tests/parity/test_kernel_parity.py \
  tests/parity/test_write_kernel.py -k "views or exactly_its_rows"
step variant_ab 100 python tools/variant_ab.py 16384x1,32768x1,32768x16 --variants whole,two
step queue 90 python tools/queue_probe.py 16384x1,32768x1 --splits 32,64,128 --blocks 256
step clock_views 40 python tools/block_clock.py 32768x1 --calls 200 --views
step gather_views 110 python -c "import sys
from pagedkv.mlx_backend.kernels import decode
decode.POOL_VIEWS = True  # what the step measures: the shipped switch is off until the tests pass
from pagedkv.__main__ import main
sys.exit(main(['bench', 'gather', '--full', '--out', sys.argv[1]]))" "$out"
step step_views 150 python tools/step_split.py 1 views pool=16 views+pool=16
