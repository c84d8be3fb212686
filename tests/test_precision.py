"""bf16 / fp16 bases: adapters and router state in fp32 (PEFT's autocast_adapter_dtype), routing in fp32.

Rows of the method matrix in each 16-bit base dtype. What goes wrong without fp32 adapters: AdamW's small
updates round away in bf16 (after 2 steps at lr 1e-5 only ~2% of lora_A entries had moved), SMoRA's bias
steps of 1e-5 vanish in a bf16 addition, and fp16 training overflows.
"""

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from tests.test_method_matrix import METHOD_CASES, _batch

_FP32_LOSS = {}  # method -> (loss at start, loss after 30 steps) of the fp32 run, shared by both 16-bit rows

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _model(method, dtype, **extra):
    base, _ = resolve_base_model("tiny-random-llama", dtype=dtype)
    torch.manual_seed(0)
    return moelora.get_moelora_model(base, {"name": method, **METHOD_CASES[method], **extra},
                                     base_model_id="tiny-random-llama")


def _router_buffers(model):
    """Every floating buffer an adapter layer owns (SMoRA's bias and counts, statistics, expert scalings)."""
    return {f"{name}.{key}": b for name, layer in model.adapter_layers().items()
            for key, b in layer.named_buffers() if not key.startswith("base_layer.") and b.is_floating_point()}


def _train(model, batch, steps, lr):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    model.train()
    loss = None
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_router_state()
    return float(loss.detach())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHOD_CASES)
def test_adapter_tensors_and_router_state_are_fp32(method, dtype):
    model = _model(method, DTYPES[dtype])
    assert model.trainable_parameters()
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    buffers = _router_buffers(model)
    assert all(b.dtype == torch.float32 for b in buffers.values()), {n: b.dtype for n, b in buffers.items()}
    # the base stays in its own dtype
    assert model.base_model.get_input_embeddings().weight.dtype == DTYPES[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHOD_CASES)
def test_two_small_steps_move_every_entry_that_got_a_gradient(method, dtype, batch):
    model = _model(method, DTYPES[dtype])
    batch = _batch(method, model, batch)
    from tests.conftest import randomize_adapters

    randomize_adapters(model, seed=1)  # B = 0 would give A no gradient at step 1
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    model.train()
    got_grad = {}
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad and p.grad is not None:
                got_grad[n] = got_grad.get(n, torch.zeros_like(p, dtype=torch.bool)) | (p.grad != 0)
        opt.step()
        opt.zero_grad()
    changed = sum(int(((p.detach() != before[n]) & got_grad[n]).sum()) for n, p in model.named_parameters() if n in got_grad)
    total = sum(int(g.sum()) for g in got_grad.values())
    assert total > 0
    assert changed >= 0.99 * total, f"only {changed}/{total} entries with a gradient changed"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHOD_CASES)
def test_thirty_steps_reach_the_fp32_loss(method, dtype, batch):
    if method not in _FP32_LOSS:
        model = _model(method, torch.float32)
        inputs = _batch(method, model, batch)
        start = float(model(**inputs, labels=inputs["input_ids"]).loss)
        _FP32_LOSS[method] = start, _train(model, inputs, steps=30, lr=1e-2)
    start, fp32 = _FP32_LOSS[method]
    model = _model(method, DTYPES[dtype])
    got = _train(model, _batch(method, model, batch), steps=30, lr=1e-2)
    assert fp32 < 0.95 * start  # the run learns at all
    assert abs(got - fp32) <= 0.05 * fp32, {"fp32": fp32, dtype: got}


def test_keeping_the_base_dtype_is_a_choice(batch):
    model = _model("smora", torch.bfloat16, autocast_adapter_dtype=False)
    assert {p.dtype for p in model.trainable_parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for b in _router_buffers(model).values())  # router state: fp32 always
    model(**batch, labels=batch["input_ids"]).loss.backward()


def _selections(model, batch):
    """The sorted top-k rank ids of every token in every SMoRA layer, [layers * tokens, k]."""
    chosen = []
    for layer in model.adapter_layers().values():
        def spy(logits, layer=layer, route=type(layer).route):
            selected, gates = route(layer, logits)
            chosen.append(torch.sort(selected, dim=-1).values)
            return selected, gates

        layer.route = spy
    model.eval()
    with torch.no_grad():
        model(**batch)
    for layer in model.adapter_layers().values():
        del layer.route
    return torch.cat(chosen)


def test_smora_bias_steps_change_top_k_in_bf16_as_in_fp32(batch):
    """50 same-sign bias updates of 1e-5 (the reference's rate) change some tokens' top-k; in bf16 arithmetic
    they changed none (the step vanished in the addition to sigmoid scores near 0.5)."""
    fractions = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = _model("smora", dt, r=16, k=4)
        with torch.no_grad():  # small router logits: sigmoid scores near 0.5, as in a freshly initialised real model
            for layer in model.adapter_layers().values():
                layer.router.mul_(0.05)
        before = _selections(model, batch)
        r = 16
        counts = torch.arange(r, dtype=torch.float32) * 10  # ranks 0.. under-loaded: their bias rises each step
        for _ in range(25):
            for layer in model.adapter_layers().values():
                layer.apply_step(counts.clone())
        after = _selections(model, batch)
        fractions[name] = float((before != after).any(-1).float().mean())
    assert fractions["fp32"] > 0, fractions
    assert fractions["bf16"] >= 0.5 * fractions["fp32"], fractions
