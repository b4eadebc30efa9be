"""`genserve` verbs that need model code: train, evaluate, sample (offline)."""
