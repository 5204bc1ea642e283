"""The engine's shared core: the probe plan (mode, chunk size, memory), the lazy one-hot basis,
the chunked runner with its fallbacks, the switch for the fast paths, a function call's problem
and state, graph structure (reachability, the coupling check's sample sets) and the structural
proof that a model keeps samples apart. Every other family imports from here; core imports from
none of them."""
