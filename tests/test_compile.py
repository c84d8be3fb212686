"""torch.compile: every method's training forward + backward is one graph, and equals eager.

`torch._dynamo.explain` counts graph breaks; `fullgraph=True` would raise on one. Router bookkeeping done in the
forward (SMoRA's load counts, every router's statistics, LoRA-Mixer's loss terms) must come out exactly as in eager,
also with gradient checkpointing, where eager skips the recomputation inside backward (`in_backward`).
The aot_eager backend runs dynamo + AOT autograd (functionalised buffer updates, the compiled backward) without
generating C++ (Inductor's code generation is measured in benchmarks/bench_train_step.py --compile).
"""

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from tests.conftest import randomize_adapters
from tests.test_method_matrix import METHOD_CASES, _batch


def _model(method, checkpointing=False):
    base, _ = resolve_base_model("tiny-random-llama")
    torch.manual_seed(0)
    model = moelora.get_moelora_model(base, {"name": method, **METHOD_CASES[method]}, base_model_id="tiny-random-llama")
    randomize_adapters(model, seed=3)
    if checkpointing:
        model.enable_gradient_checkpointing()
        model.base_model.config.use_cache = False  # as train.py: no KV cache while training
    model.train()
    return model


def _step(model, inputs, run):
    """One training forward + backward through `run`; returns (loss, grads, router state) after it."""
    torch.manual_seed(11)  # the same dropout masks eager and compiled (X-LoRA's classifier, the speech LoRA)
    out = run(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = [p.grad.detach().clone() for p in model.trainable_parameters()]
    state = {k: v.detach().clone() for name, layer in model.adapter_layers().items()
             for k, v in ((f"{name}.{key}", b) for key, b in layer.named_buffers() if not key.startswith("base_layer."))}
    return out.loss.detach(), grads, state


@pytest.mark.parametrize("method", METHOD_CASES)
def test_training_forward_has_no_graph_break(method, batch):
    model = _model(method)
    inputs = _batch(method, model, batch)
    torch._dynamo.reset()
    # The whole call, hooks included, as `model.compile()` (train.py) traces it: a multimodal model's media
    # arrive through a forward pre-hook, which `torch.compile(model)` would trace as a graph of its own.
    explained = torch._dynamo.explain(lambda **kw: model(**kw))(**inputs, labels=inputs["input_ids"])
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    assert explained.graph_count == 1


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1]):
        # relative to the whole gradient: compiled graphs reassociate sums, which moves single near-zero entries
        assert float((g - w).norm()) <= 1e-4 * float(w.norm()) + 1e-8, float((g - w).norm() / w.norm())
    assert got[2].keys() == want[2].keys()
    for key in want[2]:  # load counts, statistics, loss-term sums: counted once per forward, as in eager
        torch.testing.assert_close(got[2][key], want[2][key], rtol=1e-5, atol=1e-6, msg=key)


# Every method plainly; with gradient checkpointing the methods whose forward keeps router bookkeeping that
# a recomputation would double (SMoRA's counts, LoRA-Mixer's loss terms).
CASES = [(m, False) for m in METHOD_CASES] + [(m, True) for m in ("smora", "lora_mixer")]


@pytest.mark.parametrize("method,checkpointing", CASES,
                         ids=[f"{m}-{'checkpointing' if c else 'plain'}" for m, c in CASES])
def test_compiled_step_equals_eager(method, checkpointing, batch):
    eager_model = _model(method, checkpointing)
    inputs = _batch(method, eager_model, batch)
    want = _step(eager_model, inputs, eager_model)
    model = _model(method, checkpointing)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break would raise
    _assert_same(_step(model, inputs, compiled), want)
    for m in (model, eager_model):  # the second call runs the cached graph: bookkeeping must not need tracing
        for p in m.trainable_parameters():
            p.grad = None
    _assert_same(_step(model, inputs, compiled), _step(eager_model, inputs, eager_model))
    # one graph for both steps: nothing that changes per step (a counter on a module) is baked into the trace.
    # A model with encoders has two: dynamo traces the encoders' forward pre-hook (media -> inputs_embeds) as a
    # frame of its own before the forward (known limit, README "torch.compile").
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == (2 if "encoders" in model._modules else 1)


def test_smora_router_update_after_compiled_steps_equals_eager(batch):
    """The once-per-optimizer-step bias update reads the counts the compiled forwards accumulated."""
    results = []
    for compile_it in (False, True):
        model = _model("smora")
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compile_it else model
        torch._dynamo.reset()
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        for _ in range(3):
            run(**batch, labels=batch["input_ids"]).loss.backward()
            opt.step()
            opt.zero_grad()
            model.update_router_state()
        results.append({n: layer.bias.clone() for n, layer in model.adapter_layers().items()})
    assert any(b.abs().sum() > 0 for b in results[0].values())
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=0, atol=0)


@pytest.mark.parametrize("frozen", [False, True], ids=["encoders-trained", "encoders-frozen"])
def test_soft_words_compile_without_graph_breaks_and_equal_eager(frozen):
    """The autoregressive writer decodes greedily inside the forward (16 steps under no_grad, argmax); compiled
    with fullgraph=True, the encoders' hook and the forward still trace without a break (two graphs, as every model
    with encoders) and train as eager, with the encoders trained and frozen (the perceive recipe's LM stage)."""
    from tests.multimodal_batches import mixed_batch, soft_words_model

    eager, tokenizer = soft_words_model(frozen)
    eager.train()
    inputs = mixed_batch(eager, tokenizer)
    want = _step(eager, inputs, eager)
    model, _ = soft_words_model(frozen)
    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break would raise
    _assert_same(_step(model, inputs, compiled), want)
    assert any(p.grad is not None for p in model.encoders.parameters()) != frozen
