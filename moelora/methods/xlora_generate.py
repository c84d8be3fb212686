"""X-LoRA generation with one KV cache per pass: two single-token forwards per new token, exactly.

Why it is exact: in a causal decoder the scaling pass's hidden state at position t depends only on tokens
<= t, so the scalings of a position never change once computed; the real pass is causal too. Keeping one
cache for the scaling pass and one for the real pass therefore reproduces uncached generation (PEFT forces
`use_cache=False` and re-runs both passes over the whole prefix for every token: O(T^2) work).

Positions follow transformers' generate: `cumsum(attention_mask) - 1` (0 on padding), so left-padded
batches decode as they do in Hugging Face generation. Decoding is greedy or sampled (temperature, top-k,
top-p), stops per sequence at EOS (then pads), and returns prompt + new tokens like `generate`.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import ConfigError

# Logits processors transformers would apply that this loop does not implement: refused, never ignored.
_NEUTRAL = {"num_beams": (None, 1), "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
            "bad_words_ids": (None,), "num_return_sequences": (None, 1), "penalty_alpha": (None,),
            "typical_p": (None, 1.0), "min_p": (None,), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
            "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "suppress_tokens": (None,),
            "begin_suppress_tokens": (None,), "sequence_bias": (None,), "guidance_scale": (None, 1.0)}


_UNSET = object()  # eos_token_id=None means "no EOS" (as in transformers); left out means the model's


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _eos_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending, as transformers' top-p warper
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int | None = None, min_new_tokens: int = 0, do_sample: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             eos_token_id=_UNSET, pad_token_id: int | None = None, use_cache: bool = True, generation_config=None,
             sample_labels=None, max_length: int | None = None, inputs_embeds: torch.Tensor | None = None,
             **unsupported) -> torch.Tensor:
    """Greedy or sampled decoding of `model` (an XLoRAModel); returns [B, prompt + new] token ids.
    `inputs_embeds` ([B, prompt, d], e.g. with image/audio features over placeholders) replace the prompt's token
    embeddings; the new tokens are read by id."""
    from transformers import DynamicCache

    gen = generation_config or model.base_model.generation_config
    for key, value in unsupported.items():
        if key not in _NEUTRAL or value not in _NEUTRAL[key]:
            raise ConfigError(f"generate.{key}", "is not supported by X-LoRA's two-cache decoding (supported: "
                              "max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, "
                              "pad_token_id, use_cache)")
    for key, neutral in _NEUTRAL.items():
        if getattr(gen, key, None) not in neutral:
            raise ConfigError(f"generation_config.{key}", f"= {getattr(gen, key)!r} is not supported by X-LoRA's "
                              "decoding loop; reset it in model.generation_config")
    if input_ids is None:
        raise ConfigError("generate.input_ids", "X-LoRA generation needs input_ids")
    if max_new_tokens is None:
        max_new_tokens = gen.max_new_tokens if gen.max_new_tokens is not None else (
            (max_length or gen.max_length or 20) - input_ids.shape[1])
    do_sample = gen.do_sample if do_sample is None else do_sample
    temperature = (gen.temperature or 1.0) if temperature is None else temperature
    top_k = (gen.top_k or 0) if top_k is None else top_k
    top_p = (gen.top_p if gen.top_p is not None else 1.0) if top_p is None else top_p
    eos = torch.tensor(_eos_ids(gen.eos_token_id if eos_token_id is _UNSET else eos_token_id),
                       dtype=torch.long, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
    if pad is None:
        pad = int(eos[0]) if eos.numel() else 0

    model._check_token_ids(input_ids)
    ids = input_ids
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    layers_on = any(layer.adapter_enabled for layer in model.xlora_layers)
    # Only the last position's logits are needed (models without `logits_to_keep` compute them all).
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.base_model.forward).parameters else {}
    caches = (DynamicCache(config=model.base_model.config), DynamicCache(config=model.base_model.config))
    step_ids, step_pos = ids, _positions(mask)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(max(0, max_new_tokens)):
        if not use_cache:  # reference path: both passes over the whole sequence, as PEFT does
            step_ids, step_pos = ids, _positions(mask)
        inputs = dict(input_ids=step_ids, attention_mask=mask, position_ids=step_pos)
        if inputs_embeds is not None and (step == 0 or not use_cache):  # the prompt runs from its embeddings
            new = model.base_model.get_input_embeddings()(ids[:, inputs_embeds.shape[1]:]).to(inputs_embeds.dtype)
            inputs = dict(inputs_embeds=torch.cat([inputs_embeds, new], dim=1), attention_mask=mask,
                          position_ids=step_pos)
        model.context.start_forward(mask, sample_labels, generating=True)
        scaling_cache, real_cache = caches if use_cache else (None, None)
        model.context.model_gates = model.compute_scalings(past_key_values=scaling_cache, **inputs) if layers_on else None
        out = model.base_model(**inputs, past_key_values=real_cache, use_cache=use_cache, **keep)
        logits = out.logits[:, -1, :].float()
        if step < min_new_tokens and eos.numel():
            logits[:, eos] = float("-inf")
        nxt = _pick(logits, do_sample, temperature, top_k, top_p)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if eos.numel():
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
        step_ids, step_pos = nxt[:, None], _positions(mask)[:, -1:]
    return ids
