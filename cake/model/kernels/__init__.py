"""The kernels that multiply by quantized weights: the candidates per format and device
(candidates), cake's own CPU kernels (cpu_avx2.cpp, built by native), and the choice among
them, measured on this machine and remembered (probe)."""
