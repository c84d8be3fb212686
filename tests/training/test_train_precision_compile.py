"""train.py off the fp32/eager path: 16-bit bases, the compiled forward, and response-only logits give the run
the fp32 eager full-logits run gives (issue 13)."""

import json

import pytest
import torch

from tests.tiny_runs import TEXT, TINY_RUN, train

TINY = [*TINY_RUN, *TEXT, "data.n_eval_per_task=2", "eval_before_training=false", "eval_strategy=no", "max_steps=4",
        "method={name: smora, r: 8, k: 2, alpha: 4, bias_update_rate: 1.0e-3}"]
_REFERENCE = {}


def _losses(tmp_path, *extra):
    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    train.main([*TINY, f"output_dir={out}", *extra])
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _reference(tmp_path):
    if "fp32" not in _REFERENCE:
        _REFERENCE["fp32"] = _losses(tmp_path, "logits_on_supervised_only=false")
    return _REFERENCE["fp32"]


def test_response_only_logits_train_exactly_as_full_logits(tmp_path):
    assert _losses(tmp_path) == pytest.approx(_reference(tmp_path), rel=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sixteen_bit_bases_train_like_fp32(tmp_path, dtype):
    got = _losses(tmp_path, f"dtype={dtype}")
    assert all(map(lambda v: v == v and abs(v) < 1e4, got))  # finite: float16 used to stop at step 2
    assert got == pytest.approx(_reference(tmp_path), rel=0.01)


def test_compile_key_compiles_the_training_forward(tmp_path, monkeypatch):
    """compile=true compiles the model in place with compile_mode; here with aot_eager (Inductor's C++ build
    takes minutes on this CPU) so the test runs dynamo and AOT autograd on the real training loop."""
    calls = []
    original = torch.nn.Module.compile

    def compile_with_aot_eager(self, *args, **kwargs):
        calls.append(kwargs.get("mode"))
        return original(self, backend="aot_eager", fullgraph=True)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_aot_eager)
    torch._dynamo.reset()
    got = _losses(tmp_path, "compile=true", "compile_mode=max-autotune-no-cudagraphs")
    assert calls == ["max-autotune-no-cudagraphs"]
    assert got == pytest.approx(_reference(tmp_path), rel=1e-4)
