"""Run the Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET is read when a `@triton.jit` function is *defined*, so it must be set before
`moelora.kernels.rank_activation` is imported; this conftest is imported before the test modules
of this folder. MOELORA_BACKEND is not touched here: tests call the Triton op directly, or set the
backend per test with monkeypatch, so nothing leaks into other test folders.
"""

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

# If another folder's tests imported the kernel module first (compiled mode, unusable without a
# GPU driver), rebuild it under the interpreter and drop the dispatcher's cached reference.
_mod = sys.modules.get("moelora.kernels.rank_activation")
if _mod is not None and not _mod.INTERPRET:
    importlib.reload(_mod)
    import moelora.ops

    moelora.ops._TRITON_OP = None
