#!/usr/bin/env bash
# The fused operators' GPU checks in one run, on a machine with a CUDA device, PyTorch, OpenAI
# Triton and a C++ compiler, from the repository root, without installing genserve:
#   1. builds the operator library (the CPU kernels and the operator schemas the GPU kernels attach to) and
#      the CUDA C++ kernels' library (nvcc);
#   2. exports the shipped Gated PixelCNN, PixelCNN, PixelVAE, MAF and PixelCNN++ into model_repository/ and
#      runs tests/gpu (exact images against naive sampling, call parity, device errors, MAF's and PixelCNN++'s
#      fallback to their graphs);
#   3. runs bench-sampler on the GPU for the image samplers with GPU kernels (naive vs TorchScript step
#      graphs vs fused, batch 1 .. 16384, continuous vs static);
#   4. profiles the fused row call (deploy/gpu/profile_fused.py: wall, kernel and CUDA-graph time)
#      and the engine around it (profile-engine: deploy/gpu/profile_engine.py, the host's share).
# Each step has its own time limit and a failed step does not stop the next: one lent GPU session
# should bring back everything that works. Results go to $OUT (default /tmp/gpu-check): device.txt,
# steps.log (each step's exit status and seconds), tests.log, bench-MODEL.txt and .json, profile.txt,
# profile-engine.txt.
# STEPS (default "tests bench-gated profile bench-pixelcnn bench-pixel-vae") picks which of 2-4 run, in that order
# (batching-gated: the batching comparison at LOAD, default 0.8; profile-batch1: the step kernel's
# launch variants at batch 1, profile-batch1.txt; profile-resident: the Gated and PixelCNN steps on the
# resident CUDA C++ kernels and the Gated refresh split in two launches, against the Triton kernels at
# batch 1-4096, profile-resident.txt; bench-resident: bench-sampler with both on at RESIDENT_BATCHES,
# default "1 16 64 4096", Gated PixelCNN then PixelCNN); BENCH_BATCHES (default
# "1 16 64 256 1024 4096 16384") sets bench-sampler's batch sizes; PROFILE_ARGS go to profile_fused.py,
# ENGINE_ARGS to profile_engine.py. BUDGET (seconds, default 0: none) bounds the whole run: a step
# gets at most what is left of it, less 20 s to write up, and one that would get under 30 s is
# skipped and logged as such, so a run under a command time limit still brings back steps.log.
# Python packages the machine lacks can be put in .whl/ as wheels (installed into /tmp/site first).
set -uo pipefail
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
mkdir "$SHIM/bin"  # the verb as a command (not a shell function), so `timeout` can run it
printf '#!/bin/sh\nexec "%s" -m genserve.clients.cli "$@"\n' "$PYTHON" >"$SHIM/bin/genserve"
chmod +x "$SHIM/bin/genserve"
export PATH=$SHIM/bin:$PATH

nvidia-smi -L | tee "$OUT/device.txt"
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/device.txt"

# step SECONDS NAME COMMAND...: runs it under a time limit (within BUDGET), logs its status and duration, never
# fails the script
BUDGET=${BUDGET:-0}
step() {
  local limit=$1 name=$2 start=$SECONDS
  shift 2
  if (( BUDGET > 0 )); then
    local left=$((BUDGET - SECONDS - 20))
    if (( left < 30 )); then
      echo "$name: skipped, ${left}s of BUDGET=${BUDGET}s left" | tee -a "$OUT/steps.log"
      return 124
    fi
    (( limit > left )) && limit=$left
  fi
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  local status=$?
  echo "$name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/steps.log"
  return $status
}

step 300 build-ops genserve build-ops || exit 1
genserve build-ops --check | tee -a "$OUT/device.txt"
step 150 export genserve export gated_pixelcnn_mnist pixelcnn_mnist pixel_vae_mnist maf_mnist pixelcnn_pp_mnist \
  --repository model_repository >/dev/null || exit 1

bench() {  # bench NAME MODEL [ARGS]: naive vs step graphs vs fused on the GPU, then continuous vs static batching
  local name=$1 model=$2
  shift 2
  step 300 "$name" genserve bench-sampler "$model" --repository model_repository --runtime torchscript \
    --device cuda $(printf -- '--batch %s ' ${BENCH_BATCHES:-1 16 64 256 1024 4096 16384}) --naive-steps 8 \
    --json "$OUT/$name.json" "$@" | tee "$OUT/$name.txt"
}
for what in ${STEPS:-tests bench-gated profile bench-pixelcnn bench-pixel-vae}; do
  case $what in
    tests) step 240 tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests.log" ;;
    bench-gated) bench bench-gated_pixelcnn_mnist gated_pixelcnn_mnist ;;
    bench-pixelcnn) bench bench-pixelcnn_mnist pixelcnn_mnist ;;
    bench-pixel-vae) bench bench-pixel_vae_mnist pixel_vae_mnist ;;  # the gated kernels with a conditioning map
    batching-gated)  # the batching comparison again at a higher load, one small batch for the speed table
      BENCH_BATCHES=1 bench batching-gated_pixelcnn_mnist gated_pixelcnn_mnist --load "${LOAD:-0.8}" ;;
    profile) step 200 profile "$PYTHON" deploy/gpu/profile_fused.py --out "$OUT/profile.txt" ${PROFILE_ARGS:-} ;;
    profile-batch1)  # the step kernel's launch at batch 1: warps x slots per program, 16 slot rows vs 1-2
      step 240 profile-batch1 "$PYTHON" deploy/gpu/profile_fused.py gated_pixelcnn_mnist --out "$OUT/profile-batch1.txt" \
        --batch 1 --batch 2 --variant default --variant 8x1 --variant 4x1 --variant 1x1 --variant 4x2 ;;
    profile-resident)  # the resident step kernels and the split refresh against the Triton kernels
      # (WxS: W warps per Triton program, for the split refresh's kernels at batch 1 and the Triton step at 4096)
      step 360 profile-resident "$PYTHON" deploy/gpu/profile_fused.py gated_pixelcnn_mnist pixelcnn_mnist \
        --out "$OUT/profile-resident.txt" --batch 1 --batch 2 --batch 16 --batch 64 --batch 256 --batch 4096 \
        --variant default --variant resident --variant resident128 --variant split --variant resident+split \
        --variant resident+split+4x16 --variant resident+split+16x16 --variant 16x16 ;;
    bench-resident)  # bench-sampler with every step on the resident kernels, Gated refreshes of <= 64 slots split
      for model in gated_pixelcnn_mnist pixelcnn_mnist; do
        GENSERVE_RESIDENT_STEP_SLOTS=1000000 GENSERVE_SPLIT_REFRESH_SLOTS=64 \
          BENCH_BATCHES="${RESIDENT_BATCHES:-1 16 64 4096}" bench "bench-resident-$model" "$model"
      done ;;
    profile-engine) step 150 profile-engine "$PYTHON" deploy/gpu/profile_engine.py --out "$OUT/profile-engine.txt" \
      ${ENGINE_ARGS:-} ;;
    *) echo "unknown step $what (tests, bench-gated, bench-pixelcnn, bench-pixel-vae, batching-gated, profile," \
         "profile-batch1, profile-resident, bench-resident, profile-engine)"
       exit 2 ;;
  esac
done
cat "$OUT/steps.log"
