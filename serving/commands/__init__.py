"""`genserve` verbs that need only artifacts: triton (and, later, serve)."""
