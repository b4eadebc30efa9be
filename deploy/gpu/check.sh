#!/usr/bin/env bash
# The fused operators' GPU checks in one run, on a machine with a CUDA device, PyTorch, OpenAI
# Triton and a C++ compiler, from the repository root, without installing genserve:
#   1. builds the operator library (the CPU kernels and the operator schemas the GPU kernels attach to);
#   2. exports the shipped Gated PixelCNN and PixelCNN into model_repository/ and runs tests/gpu
#      (exact images against naive sampling, call parity, device errors);
#   3. runs bench-sampler on the GPU for both (naive vs TorchScript step graphs vs fused,
#      batch 1 .. 1024, continuous vs static).
# Results go to $OUT (default /tmp/gpu-check): device.txt, tests.log, bench-MODEL.txt and .json.
# Python packages the machine lacks can be put in .whl/ as wheels (installed into /tmp/site first).
set -euo pipefail
OUT=${OUT:-/tmp/gpu-check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
ROOT=$(pwd)

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# genserve's packages under their import names (pyproject's package-dir), as links: no install needed.
SHIM=$(mktemp -d)
mkdir "$SHIM/genserve"
touch "$SHIM/genserve/__init__.py"
for part in export serving clients; do ln -s "$ROOT/$part" "$SHIM/genserve/$part"; done
ln -s "$ROOT/serving/proto/genserve/v1" "$SHIM/genserve/v1"
"$PYTHON" - "$SHIM" <<'PY'  # the verbs are entry points: a dist-info listing them, from pyproject.toml
import pathlib, sys, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path(sys.argv[1]) / "genserve-0.dist-info"
info.mkdir()
(info / "METADATA").write_text("Metadata-Version: 2.1\nName: genserve\nVersion: 0\n")
groups = {"console_scripts": project["scripts"], **project["entry-points"]}
(info / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items()) + "\n"
    for group, entries in groups.items()))
PY
export PYTHONPATH=$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
genserve() { "$PYTHON" -m genserve.clients.cli "$@"; }

nvidia-smi -L | tee "$OUT/device.txt"
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/device.txt"
genserve build-ops
genserve build-ops --check | tee -a "$OUT/device.txt"

genserve export gated_pixelcnn_mnist pixelcnn_mnist --repository model_repository >/dev/null
"$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests.log"

for model in gated_pixelcnn_mnist pixelcnn_mnist; do
  genserve bench-sampler "$model" --repository model_repository --runtime torchscript --device cuda \
    --batch 1 --batch 16 --batch 64 --batch 256 --batch 1024 --naive-steps 8 --json "$OUT/bench-$model.json" \
    | tee "$OUT/bench-$model.txt"
done
