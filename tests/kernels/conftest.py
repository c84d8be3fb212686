"""Run the Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET is read when a `@triton.jit` function is *defined*, so it must be set before
the kernel modules of `moelora.kernels` are imported; this conftest is imported before the test modules
of this folder. MOELORA_BACKEND is not touched here: tests call the Triton op directly, or set the
backend per test with monkeypatch, so nothing leaks into other test folders.
"""

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

# If another folder's tests imported the kernel modules first (compiled mode, unusable without a
# GPU driver), rebuild them under the interpreter, each layer after those it imports from, and drop
# the dispatcher's cached reference.
_LAYERS = ("plans", "jit_tiles", "jit_gemm", "jit_routing", "launchers", "operators", "rank_activation")
_plans = sys.modules.get("moelora.kernels.plans")
if _plans is not None and not _plans.INTERPRET:
    for _name in _LAYERS:
        _mod = sys.modules.get(f"moelora.kernels.{_name}")
        if _mod is not None:
            importlib.reload(_mod)
    import moelora.ops

    moelora.ops._TRITON_OP = None
