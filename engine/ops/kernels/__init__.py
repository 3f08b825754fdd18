"""CUDA kernels of the custom ops: source (`*.cu`) and their cuda-python launchers."""
