#!/usr/bin/env bash
# On a machine with TensorRT and an NVIDIA GPU: run every TensorRT test in one command.
#   tools/device_check.sh [report.json]
# Builds resnet18 int8 and fp16 engines, compares them with onnxruntime, times both (int8 must be faster
# than fp16: the report says so either way), runs the device build of a portable bundle, the timing
# cache, compatibility/refit/strip options, a parser error naming its node, and DLA where the device has one.
set -euo pipefail
cd "$(dirname "$0")/.."
REPORT="${1:-device_check_report.json}"
PY="${PYTHON:-python3}"
"$PY" - <<'PY'
import sys
try:
    import tensorrt
except ImportError:
    sys.exit("device_check: TensorRT is not installed here (pip install tensorrt, or JetPack)")
if getattr(tensorrt, "Builder", None) is None:
    sys.exit("device_check: only tensorrt-stubs is installed here, not TensorRT")
print("TensorRT", tensorrt.__version__)
PY
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found (Jetson: tegrastats)"
export DC_DEVICE_REPORT="$PWD/$REPORT" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
set +e
"$PY" -m pytest -q -p no:cacheprovider -m tensorrt tests/test_tensorrt_gpu.py -rs
rc=$?
set -e
if [ -f "$DC_DEVICE_REPORT" ]; then
  echo "--- $REPORT"; cat "$DC_DEVICE_REPORT"; echo
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])).get('resnet18'); print('int8 faster than fp16:', None if r is None else r['int8_faster_than_fp16'])" "$DC_DEVICE_REPORT"
fi
exit $rc
