#!/usr/bin/env bash
# temporary device script
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation . || exit 1
export PYCUSPARSELT_CACHE_DIR=/tmp/tc PYTHONUNBUFFERED=1 PYCUSPARSELT_HYPOTHESIS_PROFILE=gpu
nvidia-smi -L
T=""; python3 -c "import pytest_timeout" 2>/dev/null && T="--timeout=150"
start=$(date +%s)
timeout ${PT:-330} python3 -P -m pytest -m gpu -q -n 4 --dist loadfile $T -p no:cacheprovider -W ignore::DeprecationWarning \
  -rf --tb=short --junitxml=$OUT/junit_gpu.xml ${TESTS:-} > $OUT/pytest.log 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/pytest.log | tail -30
if [ -n "${MLP:-}" ]; then
timeout ${MT:-170} python3 -P benchmarks/mlp_scaling.py --gpus 1 2 --repeat 20 --json $OUT/mlp_scaling.json > $OUT/mlp.log 2>&1
echo "mlp rc=$?"; tail -25 $OUT/mlp.log
fi
python3 -P scripts/gpu_summary.py $OUT > /dev/null 2>&1; ls $OUT
