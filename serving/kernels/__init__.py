"""Numerical kernels shared by the offline models and the online sampling engine.

`export` may import this package (the one exception to "serving never meets export") so that a model sampled offline
and the same model sampled by the server choose identical pixels from identical noise.
"""
