"""Kernel tests. The package sets up Triton's interpreter on CPU-only machines (triton_env.py) before
any test module imports a kernel module: TRITON_INTERPRET=1 is read when a kernel is defined."""

from . import triton_env  # noqa: F401 - imported for its effect, first
