"""Shared test set-up: single-threaded BLAS (2 shared cores make threaded SVD/GEMM erratic)."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
