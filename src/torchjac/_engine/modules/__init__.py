"""Per-sample parameter Jacobians and kernels of ``nn.Module`` models (``param_jacobian``,
``ntk``): layer capture and closed forms, the parameter chain (from an ``nn.Sequential`` or from
the ops of any forward), the op-level batch proof, ghost kernels and the general per-sample
path. Imports ``core``, ``kernel``, ``graph`` and ``taylor``."""
