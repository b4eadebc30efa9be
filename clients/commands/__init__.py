"""The client verbs: models, sample, score, encode, decode (query.py), batch, bench."""
