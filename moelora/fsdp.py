"""FSDP2 (torch's `fully_shard`, what accelerate's `fsdp_version: 2` applies): full adapter tensors for saving.

Under FSDP2 every parameter is a DTensor holding this process's shard. Inside `MoELoRAModel.gathered_adapter()`
(`gathered_fsdp` here) each saved parameter is replaced by its full tensor, gathered on every process (a
collective: every process enters the block, in the same module order), and put back afterwards, as
DeepSpeed's GatheredParameters does for ZeRO-3; the same save code then writes full adapter tensors. The base
stays sharded. Router buffers are never sharded (FSDP2 shards parameters only) and stay in step through
`update_router_state`'s all-reduce.
"""

from __future__ import annotations

import contextlib

from torch import nn


def fsdp_units(model: nn.Module) -> list:
    """The modules `fully_shard` wrapped (empty when FSDP2 is not in use)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_fsdp(model: nn.Module, wanted: set[int]):
    """Inside: the parameters whose id is in `wanted` are full (unsharded) tensors on this process."""
    from torch.distributed.tensor import DTensor

    swapped = []
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in wanted and isinstance(p, DTensor):
                    module._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                    swapped.append((module, name, p))
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p
