"""The API's wire format: committed stubs are fresh, tensors round-trip exactly, bad tensors are named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genserve.serving.errors import InvalidArgument
from genserve.serving.tensors import from_numpy, to_numpy
from genserve.v1 import generative_pb2 as pb

PROTO_ROOT = Path(__file__).resolve().parents[2] / "serving" / "proto"
GENERATED = ("generative_pb2.py", "generative_pb2.pyi", "generative_pb2_grpc.py")


def test_committed_stubs_equal_a_fresh_generation(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROTO_ROOT), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(PROTO_ROOT / "genserve/v1/generative.proto")],
        check=True,
    )
    for name in GENERATED:
        assert (tmp_path / "genserve/v1" / name).read_text() == (PROTO_ROOT / "genserve/v1" / name).read_text(), \
            f"{name} is stale: run `make proto`"


def test_every_field_and_enum_value_of_the_proto_is_commented():
    lines = (PROTO_ROOT / "genserve/v1/generative.proto").read_text().splitlines()
    for k, line in enumerate(lines):
        code = line.split("//")[0].strip()
        is_field = code.endswith(";") and not code.startswith(("syntax", "package", "option"))
        if is_field or code.startswith(("message", "enum", "service", "rpc", "oneof")):
            assert lines[k - 1].strip().startswith("//"), f"line {k + 1} has no comment: {line.strip()}"


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    np.array([[-(2**62), 5]], dtype=np.int64),
    np.array([1.5, -0.0, np.float32(3.4e38)], dtype=np.float32).reshape(3, 1),
])
def test_tensors_round_trip_exactly_as_little_endian_bytes(array):
    message = from_numpy(array)
    assert message.data == array.astype(array.dtype.newbyteorder("<")).tobytes()
    codes = {np.uint8: pb.DATA_TYPE_UINT8, np.int64: pb.DATA_TYPE_INT64, np.float32: pb.DATA_TYPE_FLOAT32}
    code = codes[array.dtype.type]
    back = to_numpy(message, "x", code, (None, *array.shape[1:]))
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype and back.flags.writeable


def test_a_big_endian_array_is_sent_little_endian():
    array = np.array([[1, 256]], dtype=">i8")
    message = from_numpy(array)
    np.testing.assert_array_equal(to_numpy(message, "x", pb.DATA_TYPE_INT64, (None, 2)), [[1, 256]])


@pytest.mark.parametrize("tensor, field", [
    (pb.Tensor(shape=[1, 2], dtype=pb.DATA_TYPE_INT64, data=b"\0" * 16), "x.dtype"),
    (pb.Tensor(shape=[1, 2], dtype=pb.DATA_TYPE_UNSPECIFIED, data=b"\0" * 2), "x.dtype"),
    (pb.Tensor(shape=[1, 3], dtype=pb.DATA_TYPE_UINT8, data=b"\0" * 3), "x.shape"),
    (pb.Tensor(shape=[2], dtype=pb.DATA_TYPE_UINT8, data=b"\0" * 2), "x.shape"),
    (pb.Tensor(shape=[0, 2], dtype=pb.DATA_TYPE_UINT8, data=b""), "x.shape"),
    (pb.Tensor(shape=[2, 2], dtype=pb.DATA_TYPE_UINT8, data=b"\0" * 5), "x.data"),
])
def test_malformed_tensors_are_refused_naming_the_field(tensor, field):
    with pytest.raises(InvalidArgument) as caught:
        to_numpy(tensor, "x", pb.DATA_TYPE_UINT8, (None, 2))
    assert caught.value.field == field
