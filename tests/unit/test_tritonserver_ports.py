"""Ports picked for a tritonserver: its gRPC, HTTP and metrics listeners need three different ones."""
import socket

from genserve.serving.tritonserver import free_ports


def test_ports_picked_together_are_distinct_and_free():
    # Picked one at a time (bind, read, close), the kernel handed one port out twice often enough
    # to fail a CI run: Triton refused to serve HTTP and metrics on the same port.
    for _ in range(20):
        ports = free_ports(64)
        assert len(set(ports)) == 64
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))
