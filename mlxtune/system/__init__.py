"""This machine: BLAS selection for MLX, the tested-version lock, the doctor's checks."""
