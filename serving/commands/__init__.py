"""`genserve` verbs that need only artifacts, never model code.

serve, triton, bench-serve, bench-sampler, triton-bench.
"""
