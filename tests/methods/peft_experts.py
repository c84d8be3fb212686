"""PEFT-made LoRA experts for the LoRA-Mixer and X-LoRA tests (PEFT itself is the reference)."""

import warnings

import torch

from moelora.base_models import resolve_base_model

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def save_peft_lora(folder, r, alpha, targets=QKVO, seed=0, **lora_kwargs):
    """A PEFT LoRA on the tiny Llama with random (non-zero) B, saved by PEFT to `folder`."""
    from peft import LoraConfig, get_peft_model

    base, _ = resolve_base_model("tiny-random-llama")
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(str(folder))
    return str(folder)


def peft_lora_logits(folder, batch):
    """Logits of PEFT's own LoRA model loaded from `folder`."""
    from peft import PeftModel

    base, _ = resolve_base_model("tiny-random-llama")
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        return model(**batch).logits


def peft_xlora(folders, **options):
    """PEFT's XLoraModel over `folders` (named "0", "1", ...: PEFT 0.21.2 needs those names), eval mode."""
    from peft import XLoraConfig, get_peft_model

    base, _ = resolve_base_model("tiny-random-llama")
    base.config.use_cache = False  # PEFT's X-LoRA refuses a model with the cache on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                          adapters={str(i): str(f) for i, f in enumerate(folders)}, **options)
        return get_peft_model(base, cfg).eval()


def peft_classifier_state(peft_model) -> dict:
    """The X-LoRA classifier's full state, keyed as inside the classifier (layers.<i>.weight ...)."""
    marker = "internal_xlora_classifier."
    return {k.split(marker, 1)[1]: v.clone() for k, v in peft_model.state_dict().items() if marker in k}
