#!/usr/bin/env bash
# GPU check: on a bare GPU machine (torch, lightning, torchmetrics installed, NO network).
#
# 1. installs the other dependencies from the wheels in .whl/ (segmentation-models-pytorch,
#    albumentations and their missing deps; see docs/performance.md for how to fetch them);
# 2. runs the benchmark at the paper's setting (UNet features 32, 384x384, batch 16, 5 clients;
#    routed step batch 16, 384x384, 6 experts) in bf16-mixed + channels_last with the data
#    kept on the GPU (data.device_cache), plus the engine with per-tensor state ops
#    (flat_state=False), in 16-mixed (fp16: cuDNN BatchNorm, which bf16 does not get) and
#    without channels_last; the routed step mixing kernels and mixing outputs, in 16-mixed, and
#    one step under torch.profiler (where its GPU time goes); what a round waits for its
#    checkpoint, ours vs Lightning's stock setup; the outside adaptation end to end (a
#    RoutingModule fit in online mode with TENT) vs per-sample routed layers. Left out for
#    device time, both measured in sessions 1 and 5 on unchanged code: the engine in fp32
#    (2.3x slower) and through DataLoaders (device cache 2.05x faster). Then the
#    client-switch / aggregation state operations, old (load_state_dict, per-key loops) vs
#    grouped foreach ops (benchmarks/state_ops_bench.py);
# 3. the federated rounds and the routed step again with torch.compile in reduce-overhead mode
#    (CUDA graphs; session 5 on an H200: 1.33x for the round; the routed step never compiled
#    on a GPU before); the routed step there only eager and compiled (--routed-only-compiled:
#    step 2 measured its other variants);
# 4. runs the GPU-only tests (the ones CI skips: benchmark on CUDA, state ops, routed mixing,
#    device cache, metrics, fused Adam, background checkpoint writes; the CPU suite is CI's job);
# 5. if at least PROFILE_NEEDS s (default 45) are left before DEADLINE (default 570 s; the run
#    is estimated at 35-40 s: 59 s in session 5, 32 of them generating data, which is now
#    threaded), and stopped at DEADLINE, the federated rounds once more under Lightning's
#    SimpleProfiler and torch.profiler (host time per hook, ops by host and GPU time) with the
#    calls inside a client switch timed (--switch-parts: optimizer reset, NaN/inf check,
#    loading, accumulator add, EMA, server step); not a throughput figure: profilers add
#    overhead;
# 6. report.md: the figures and issue 8's targets as markdown for docs/performance.md.
# Writes log.txt (everything printed), the JSON and report.md into $OUT (or the first argument):
# six files, within what the device tool brings back (8). Run from the repository root:
#   bash benchmarks/gpu_check.sh /tmp/gpu_check
# GPU_CHECK_DRY_RUN=1 runs every step on the CPU at the tiny preset (no compile run): device
# time is scarce, so the suite runs the script this way to catch a broken step beforehand.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1  # no network there: skip its version check
if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then
  DEVICE=cpu
  SETTING=(--preset tiny --device cpu --workers 0 --device-cache)
else
  DEVICE=cuda
  SETTING=(--preset paper --device cuda --workers 4)
fi
if [ "$DEVICE" = cuda ] && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/iopfl_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/iopfl_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
$PY -c "import torch, lightning, segmentation_models_pytorch, albumentations, iopfl_lightning; \
print('torch', torch.__version__, 'lightning', lightning.__version__, \
      torch.cuda.get_device_name() if '$DEVICE' == 'cuda' else 'cpu (dry run)')" || exit 1
status=0
$PY benchmarks/run.py "${SETTING[@]}" --per-tensor-engine --fp16-engine --format-engine \
  --routed-profile --out "$OUT/paper.json" || status=1
echo "elapsed ${SECONDS}s"
# The device tool stops a call at 600 s: the compile run gets at most COMPILE_LIMIT seconds
# (run.py writes its JSON after every part, so a stopped run keeps the parts it finished) and
# the tests run only while there is time left; report.md is always written.
if [ "$DEVICE" = cuda ]; then
  timeout "${COMPILE_LIMIT:-270}" $PY benchmarks/run.py "${SETTING[@]}" --only federated routed \
    --compile --compile-mode reduce-overhead --rounds 4 --routed-only-compiled \
    --out "$OUT/paper_compile.json" || status=1
else
  echo "skipped the torch.compile run (device $DEVICE)"
fi
echo "elapsed ${SECONDS}s"
$PY benchmarks/state_ops_bench.py --device $DEVICE --out "$OUT/state_ops.json" || status=1
# stopped in time to leave report.md its seconds before DEADLINE
tests_left=$(( ${DEADLINE:-570} - SECONDS - 20 ))
if [ "$SECONDS" -lt "${TESTS_BEFORE:-500}" ] && [ "$tests_left" -gt 0 ]; then
  timeout "$tests_left" $PY -m pytest -q -p no:cacheprovider -k "gpu or cuda" tests/test_benchmarks.py \
    tests/federated/test_state_ops.py tests/nets/test_routed.py tests/nets/test_mix_choice.py \
    tests/data/test_device_cache.py tests/test_metrics.py tests/modules/test_optim.py \
    tests/test_checkpoint_io.py 2>&1 | tail -15 \
    || status=1
else
  echo "skipped the GPU-only tests (${SECONDS}s elapsed)"
fi
echo "elapsed ${SECONDS}s"
# The profiled run is optional: it gets what is left before DEADLINE s (default 570) and is
# stopped there, so that report.md is still written within the device tool's limit.
left=$(( ${DEADLINE:-570} - SECONDS - 10 ))
if [ "$left" -ge "${PROFILE_NEEDS:-45}" ]; then
  timeout "$left" $PY benchmarks/run.py "${SETTING[@]}" --only federated --profile \
    --torch-profile --switch-parts --rounds 3 --out "$OUT/paper_profile.json"
  rc=$?
  if [ "$rc" -eq 124 ]; then
    echo "the profiled run was stopped after ${left}s (its JSON keeps what it finished)"
  elif [ "$rc" -ne 0 ]; then
    status=1
  fi
else
  echo "skipped the profiled run (${SECONDS}s elapsed, ${left}s left)"
fi
$PY benchmarks/report.py "$OUT/paper.json" --state-ops "$OUT/state_ops.json" \
  --compiled "$OUT/paper_compile.json" >"$OUT/report.md" || status=1
cat "$OUT/report.md"
echo "elapsed ${SECONDS}s, status $status"
exit $status
