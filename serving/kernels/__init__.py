"""Numerical kernels shared by the offline models and the online sampling engine.

`export` may import this package (DESIGN.md import rules) so that a model sampled offline
and the same model sampled by the server choose identical pixels from identical noise.
"""
