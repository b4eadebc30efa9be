"""The import rules: clients know only the API, serving never imports export, Triton's entry-point
models run without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"clients": ("genserve.serving", "genserve.export"), "serving": ("genserve.export",)}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what `path` imports, relative imports resolved (folder X is genserve.X)."""
    package = ["genserve", *path.relative_to(ROOT).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names.add(".".join([*base, node.module] if node.module else base))
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_it_must_not(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith(FORBIDDEN[package]))
        for path in (ROOT / package).rglob("*.py") if "proto" not in path.parts
    }
    assert {k: v for k, v in offenders.items() if v} == {}


# In a fresh interpreter, as Triton's stub process runs it: the generated model.py of an entry point,
# its ONNX session loaded from the manifest and one request answered. torch would cost each of these
# processes about a second of start-up and ~230 MB; one stub runs per model.
ENTRY_POINT_STUB = """
import importlib.util, sys
from pathlib import Path
import numpy as np
from genserve.serving.artifacts import load_manifest
from genserve.serving.entry_runner import OnnxEntryPoint
folder = Path(sys.argv[1])
spec = importlib.util.spec_from_file_location("model", folder / "1" / "model.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
runner = OnnxEntryPoint.load(load_manifest(folder), 1)
outputs = runner.run_merged([{"images": np.zeros((2, 1, 28, 28), np.uint8)}])
print(sorted(outputs[0]), sorted(name for name in sys.modules if name.split(".")[0] == "torch"))
"""


def test_an_entry_points_triton_model_loads_and_answers_without_torch():
    folder = ROOT / "model_repository" / "vae_mnist_encode"
    done = subprocess.run([sys.executable, "-c", ENTRY_POINT_STUB, str(folder)], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split("\n")[0] == "['log_var', 'mean'] []"


def test_a_sampler_model_py_from_an_earlier_export_still_finds_its_class():
    # Repositories exported before the sampler moved to triton_sampler.py import it from triton_python.
    from genserve.serving.triton_sampler import SamplingModel

    earlier_model_py: dict = {}
    exec("from genserve.serving.triton_python import SamplingModel as TritonPythonModel", earlier_model_py)
    assert earlier_model_py["TritonPythonModel"] is SamplingModel
