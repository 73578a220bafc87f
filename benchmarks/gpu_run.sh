#!/usr/bin/env bash
# The GPU path, measured: run on a machine with an NVIDIA GPU (CUDA 12 driver), from the
# repository root, in one go:
#
#   bash benchmarks/gpu_run.sh                 # ~10 min on one H100/H200-class GPU
#   SECONDS_PER_PHASE=5 bash benchmarks/gpu_run.sh     # quicker, fewer samples
#
# 1. a virtual environment with the GPU runtimes (never the plain onnxruntime wheel: it and
#    onnxruntime-gpu install the same package), pinned as in deploy/Containerfile.gpu;
# 2. every shipped model built as a TensorRT engine, FP16 and INT8 (entropy calibration on the
#    synthetic calibration inputs; the cache lands beside the plans), checked against ONNX
#    Runtime CPU, the detectors' INT8 F1 parity on the held-out sets (needs ../shared/data for
#    the real sets; the synthetic one always runs);
# 3. tests/gpu/ (TensorRT and ONNX Runtime CUDA on the real GPU);
# 4. the latency benchmark at 1024² and 4096² for FP16 and INT8 (TensorRT backend).
#
# Everything goes to benchmarks/results/gpu/ (JSON, plus the pytest log); the script stops at
# the first step that fails, and the JSON of the steps before stays.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
VENV=${VENV:-.venv-gpu}
PHASE_S=${SECONDS_PER_PHASE:-10}
CACHE=${NANOSCOUT_TRT_CACHE:-$HOME/.cache/nanoscout/trt}
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/gpus.txt"

# 1. the GPU environment (pins: deploy/Containerfile.gpu)
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e '.[dev]' onnxruntime-gpu==1.22.0 tensorrt-cu12==10.13.3.9 \
        'cuda-python>=12.6,<13'
    # the project's [dev] extra pulls no onnxruntime flavour; be sure the CPU one is absent
    if "$VENV/bin/pip" show onnxruntime >/dev/null 2>&1; then
        echo "the plain onnxruntime wheel is installed beside onnxruntime-gpu: remove $VENV" >&2
        exit 1
    fi
fi
PY="$VENV/bin/python"
"$PY" -c "import tensorrt, onnxruntime; print('tensorrt', tensorrt.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())" | tee "$OUT/versions.txt"
"$PY" -c "from nanoscout.engines import available_backends; print(available_backends())" | tee -a "$OUT/versions.txt"

# 2. engines of every shipped model, FP16 then INT8 (calibration cache beside the plans)
"$PY" -m nanoscout models build-engines --precision fp16 --check --cache-dir "$CACHE" \
    --out "$OUT/engines-fp16.json"
"$PY" -m nanoscout models build-engines --precision int8 --check --parity --max-images 40 \
    --cache-dir "$CACHE" --out "$OUT/engines-int8.json"

# 3. the GPU tests
"$PY" -m pytest tests/gpu -q -rs 2>&1 | tee "$OUT/tests-gpu.log"

# 4. latency through real daemons, TensorRT, 1024² and 4096², FP16 and INT8
for precision in fp16 int8; do
    "$PY" benchmarks/latency.py --backend tensorrt --precision "$precision" --threads 4 \
        --sizes 1024 4096 --seconds "$PHASE_S" --out "$OUT/latency-tensorrt-$precision.json"
done
echo "done: $OUT"
