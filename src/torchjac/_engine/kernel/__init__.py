"""Dense kernels a CPU runs faster than torch's defaults where measured: oneDNN products and the
fused tanh (NOTE [dense kernels]), and a convolution's input gradient for many rows at once
(NOTE [convolution input gradient]). Imports only ``core``."""
