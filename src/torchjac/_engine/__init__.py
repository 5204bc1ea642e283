"""The probe engine: plan (mode, chunk size, memory), basis (lazy one-hot), run (vmap, fallback).

Front doors turn a user's question into probes and shape the answer; they never probe by hand.
"""
