# One command each for setup, the main job, tests, lint, and the shipped models.
# `make test` is what .ci/run calls and what README.md's quick start gives.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CKPT := export/checkpoints
TRAIN := $(BIN)/genserve train --no-progress

REPOSITORY := model_repository
OPS := serving/fused/_build/genserve_ops.so

.PHONY: setup run test lint proto shipped-models cards repository-sums clean

$(BIN)/genserve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: on these machines that takes the CPU wheel already on disk;
	# an open range would pull several GB of CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The shipped Triton model repository, exported from the committed checkpoints (about 20 s) and
# checked file by file against the committed SHA256SUMS: what git holds is the checkpoints, once.
# Exported again whenever a checkpoint or the code that writes the artifacts changes, so a passing
# setup means a fresh export still gives the recorded bytes.
$(REPOSITORY)/.exported: $(BIN)/genserve $(REPOSITORY)/SHA256SUMS $(wildcard $(CKPT)/*/model.safetensors) \
		$(shell find export serving -name '*.py' -not -path '*/proto/*')
	$(BIN)/genserve export shipped --repository $(REPOSITORY) --check-sums $(REPOSITORY)/SHA256SUMS
	touch $@

# The fused sampling operators, compiled for this machine (about 35 s); servers never compile.
$(OPS): $(BIN)/genserve $(wildcard serving/fused/csrc/*)
	$(BIN)/genserve build-ops
	touch $@

setup: $(BIN)/genserve $(OPS) $(REPOSITORY)/.exported

# The main job: serve the shipped models over gRPC (embedded runtime) on 127.0.0.1:50051,
# Prometheus metrics on :9095, until Ctrl-C.
run: setup
	$(BIN)/genserve serve --repository $(REPOSITORY) --port 50051 --metrics-port 9095

# Two workers, a test file each at a time (module-scoped servers stay within one), each with its
# share of the cores for its thread pools (tests/conftest.py): 12-17 minutes on a 2-core machine,
# whose tests wait on servers and subprocesses as much as they compute; they share one tritonserver
# (tests/integration/conftest.py). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: setup
	$(BIN)/ruff check export serving clients tests

# The gRPC stubs (committed) from serving/proto/genserve/v1/*.proto; a test checks they are fresh.
proto: setup
	$(BIN)/python -m grpc_tools.protoc -I serving/proto --python_out=serving/proto --pyi_out=serving/proto \
	  --grpc_python_out=serving/proto serving/proto/genserve/v1/*.proto

# Retrain the shipped checkpoints and the FID classifier (at most about 245 minutes on a 2-core CPU); each
# model card records the command that made it. Two jobs run side by side, one thread each.
shipped-models: $(BIN)/genserve
	( OMP_NUM_THREADS=1 $(BIN)/genserve train-classifier --no-progress && \
	  OMP_NUM_THREADS=1 $(TRAIN) gated_pixelcnn --out $(CKPT)/gated_pixelcnn_mnist --epochs 30 --lr 1e-3 --lr-decay 0.9 --seed 1 && \
	  OMP_NUM_THREADS=1 $(TRAIN) aae --out $(CKPT)/aae_mnist --epochs 60 --lr 1e-3 --lr-decay 0.97 --seed 1 && \
	  OMP_NUM_THREADS=1 $(TRAIN) vae_gan --out $(CKPT)/vae_gan_mnist --epochs 60 --lr 1e-3 --lr-decay 0.97 --seed 1 && \
	  OMP_NUM_THREADS=1 $(TRAIN) pixel_vae --out $(CKPT)/pixel_vae_mnist --epochs 40 --lr 1e-3 --lr-decay 0.95 --seed 1 && \
	  OMP_NUM_THREADS=1 $(TRAIN) maf --out $(CKPT)/maf_mnist --epochs 20 --lr 1e-3 --lr-decay 0.95 --seed 1 && \
	  OMP_NUM_THREADS=1 $(TRAIN) wavenet --out $(CKPT)/wavenet_speech --data spoken_digits --epochs 40 --batch-size 8 --lr 1e-3 --lr-decay 0.95 --seed 1 --set num_classes=dataset ) & \
	( OMP_NUM_THREADS=1 $(TRAIN) vae --out $(CKPT)/vae_mnist --epochs 150 --lr 1e-3 --lr-decay 0.985 --seed 1 --set hidden_units=256 && \
	  OMP_NUM_THREADS=1 $(TRAIN) iaf_vae --out $(CKPT)/iaf_vae_mnist --epochs 150 --lr 1e-3 --lr-decay 0.985 --seed 1 --set hidden_units=256 && \
	  OMP_NUM_THREADS=1 $(TRAIN) dcgan --out $(CKPT)/dcgan_mnist --epochs 30 --lr 2e-4 --seed 1 --set num_classes=dataset && \
	  OMP_NUM_THREADS=1 $(TRAIN) realnvp --out $(CKPT)/realnvp_mnist --epochs 15 --lr 1e-3 --lr-decay 0.9 --seed 1 && \
	  OMP_NUM_THREADS=1 $(TRAIN) flow_gan --out $(CKPT)/flow_gan_mnist --epochs 15 --lr 1e-3 --lr-decay 0.9 --seed 1 && \
	  OMP_NUM_THREADS=1 $(TRAIN) pixelcnn --out $(CKPT)/pixelcnn_mnist --epochs 10 --lr 1e-3 --lr-decay 0.9 --seed 1 && \
	  OMP_NUM_THREADS=1 $(TRAIN) pixelcnn_pp --out $(CKPT)/pixelcnn_pp_mnist --epochs 20 --lr 1e-3 --lr-decay 0.9 --seed 1 ) & \
	wait
	$(MAKE) cards repository-sums

# Held-out figures, sample grids (waveforms and WAV files for audio) and model cards for every shipped checkpoint.
cards: $(BIN)/genserve
	for c in $(CKPT)/*/; do $(BIN)/genserve evaluate $$c --card --fid || exit 1; done

# After retraining a shipped model: re-export the repository and record its new checksums.
repository-sums: $(BIN)/genserve
	find $(REPOSITORY) -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
	$(BIN)/genserve export shipped --repository $(REPOSITORY) --write-sums $(REPOSITORY)/SHA256SUMS
	touch $(REPOSITORY)/.exported

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
