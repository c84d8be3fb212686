"""Shared fixtures: tiny random models built in code, so the suite runs in minutes on 2 CPU cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in the interpreter; the knob is read when a kernel module is
# imported, so it must be set before any test imports moelora.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_llama():
    """(model, tokenizer): a fresh, deterministic tiny random Llama (hidden 64, 2 layers)."""
    from moelora.base_models import resolve_base_model

    return resolve_base_model("tiny-random-llama")


@pytest.fixture
def tiny_gpt2():
    from moelora.base_models import resolve_base_model

    return resolve_base_model("tiny-random-gpt2")


@pytest.fixture
def batch():
    """Two sequences of 12 tokens, the second right-padded after 8."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def randomize_adapters(model, seed=0, scale=0.05):
    """Give every adapter tensor random values (B starts at zero, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Every test starts without accelerate's process-wide state: a Trainer (tests/hf) initialises it with its own
    settings, and train.py's Accelerator in a later test of the same process would then refuse to start
    ("AcceleratorState has already been initialized")."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
