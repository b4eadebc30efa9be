"""Runtimes: where a served model's entry points run (embedded ONNX Runtime + engine, or Triton)."""
