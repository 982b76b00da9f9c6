"""Session-wide: define the Triton kernels for the CPU interpreter before anything imports them.

Triton decides at import whether `@triton.jit` kernels are compiled or interpreted. Without a GPU,
`megagpt.kernels` is imported here once with TRITON_INTERPRET=1, then the variable is unset again:
the kernel tests set it per test (tests/kernels/conftest.py) and run the kernels interpreted,
while every other test keeps the fast plain-torch path (`auto` resolves to torch on the CPU).
"""
import os

import torch

if not torch.cuda.is_available() and "megagpt.kernels" not in __import__("sys").modules:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import megagpt.kernels  # noqa: F401,E402

    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous
