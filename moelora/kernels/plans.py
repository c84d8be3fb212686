"""Launch configuration of the rank-activation kernels: routing modes, tiles, dot dtypes and split-K plans.

Fixed tiles, no autotuning (see DESIGN.md "Tiles"). A GEMM's plan (grid, slices) is computed once per shape.
CPU: set TRITON_INTERPRET=1 *before* importing moelora.kernels (Triton reads it at decoration time).
"""

import dataclasses
import functools

import torch
import triton

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

# Routing modes (a constexpr in the kernels). UNGATED is plain LoRA (no gates: H_g = H).
DENSE, SAME, SEPARATE, UNGATED = 0, 1, 2, 3
# tl.dot operand dtypes, as constexpr codes (plain ints travel through torch.compile's kernel capture).
_F32, _F16, _BF16 = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes of one launch. For GEMMs: C[M, N] with reduction K (block_k); every tl.dot
    dimension must be >= 16 on a GPU (the interpreter accepts less and would hide the bug)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# Starting points for Hopper/Ampere. A search on an H100 (benchmarks/tune_kernel_tiles.py) found nothing
# better by more than its noise: the op was launch-bound there (DESIGN.md "Measured").
GPU_TILES = {
    "shrink": Tiles(128, 64, 64, 4, 4),    # H = x A^T         M=tokens N=ranks K=d_in
    "expand": Tiles(128, 128, 64, 8, 2),   # y = out + sHgB^T  M=tokens N=d_out K=ranks
    "grad_hg": Tiles(128, 64, 64, 4, 4),   # dHg = s dY B      M=tokens N=ranks K=d_out
    "grad_x": Tiles(128, 128, 64, 8, 2),   # dX = dH A         M=tokens N=d_in  K=ranks
    "grad_a": Tiles(64, 128, 64, 4, 3),    # dA = dH^T x       M=ranks  N=d_in  K=tokens (split)
    "grad_b": Tiles(128, 64, 64, 4, 3),    # dB = s dY^T Hg    M=d_out  N=ranks K=tokens (split)
    "routing": Tiles(64, 64, 64, 4, 1),    # H_g, dH, dg       block_m=tokens block_n=ranks (no dot)
    "sum": Tiles(1024, 1, 1, 4, 1),        # split-K sums      block_m=elements (no dot)
}
# The interpreter costs ~7 ms per program x loop trip whatever the tile, so use few, large tiles.
INTERPRET_TILES = {name: Tiles(64, 64, 64, 1, 1) for name in GPU_TILES}
INTERPRET_TILES["sum"] = Tiles(4096, 1, 1, 1, 1)


def tiles_for(name: str, interpret: bool = INTERPRET) -> Tiles:
    return (INTERPRET_TILES if interpret else GPU_TILES)[name]


def _launch_opts(t: Tiles, dtype: torch.dtype) -> dict:
    """num_warps/num_stages; fp32 tiles are twice the bytes, so fewer stages keep shared memory
    under the 227 KiB an H100 block may use (tests compile every GPU launch for sm_90 to check)."""
    stages = min(t.num_stages, 3) if dtype == torch.float32 else t.num_stages
    return {"num_warps": t.num_warps, "num_stages": stages}


def _compute(dtype: torch.dtype) -> tuple[int, str]:
    """tl.dot operand dtype code and fp32 precision for an input dtype (accumulation is always fp32)."""
    if dtype == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32 and not INTERPRET  # follow torch's fp32 matmul setting
        return _F32, ("tf32" if tf32 else "ieee")
    if INTERPRET and dtype == torch.bfloat16:  # bf16 arithmetic is broken in the interpreter
        return _F32, "ieee"
    return (_F16 if dtype == torch.float16 else _BF16), "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_count(device: torch.device, grid_mn: int, k_tiles: int) -> int:
    """Slices for a splittable reduction of k_tiles tiles with grid_mn output tiles (before clamping).
    On a GPU: about one wave of programs, for a reduction of more than 16 tiles (a short one saved no
    time and cost a launch). Under the interpreter: a few slices, so that tests exercise the path."""
    if device.type == "cuda":
        return triton.cdiv(_sm_count(device.index or 0), grid_mn) if k_tiles > 16 else 1
    return triton.cdiv(4, grid_mn)


def _static(*values) -> bool:
    return all(isinstance(v, int) for v in values)  # SymInts (dynamic-shape tracing) are not cached


@functools.lru_cache(maxsize=4096)
def _gemm_plan_cached(m, n, k, tiles: Tiles, split: bool, device: torch.device):
    return _gemm_plan_uncached(m, n, k, tiles, split, device)


def _gemm_plan_uncached(m, n, k, tiles, split, device):
    """(grid, slices, k_per_split) of one GEMM launch."""
    grid_mn = triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n)
    k_tiles = triton.cdiv(k, tiles.block_k)
    splits = max(1, min(k_tiles, _split_count(device, grid_mn, k_tiles))) if split else 1
    k_per_split = triton.cdiv(k_tiles, splits) * tiles.block_k
    splits = triton.cdiv(k, k_per_split)
    return (triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n), splits), splits, k_per_split


def _gemm_plan(m, n, k, tiles, split, device):
    """The launch plan of a GEMM, computed once per shape (the op is called with the same few shapes
    every step, so a step does no launch arithmetic)."""
    if _static(m, n, k):
        return _gemm_plan_cached(m, n, k, tiles, split, device)
    return _gemm_plan_uncached(m, n, k, tiles, split, device)
