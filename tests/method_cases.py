"""Every registered method's small test configuration, in one place: the shared matrix
(`tests/test_method_matrix.py`), the data-parallel training tests and the GPU checks read it from here.

Adding a method = one row in METHOD_CASES (a small config for the tiny models), plus one in ROW_INPUTS if
the method needs more than token ids (images, audio).
"""

import json

from moelora.base_models import build_tiny_tokenizer
from tests.multimodal_batches import base_inputs, mixed_batch

METHOD_CASES = {
    "lora": {"r": 4, "alpha": 8},
    "smora": {"r": 8, "k": 2, "alpha": 4},
    "mixlora": {"num_factors": 6, "r": 2, "alpha": 4},
    # fresh experts trained jointly with the router (soft mixture), top-2 of 3 at inference
    "lora_mixer": {"experts": 3, "r": 2, "alpha": 4, "top_k": 2, "stage": "joint_stage2", "train_experts": True},
    # fresh trainable experts (PEFT X-LoRA needs folders; the matrix needs something that trains) + a depth-2 classifier
    "xlora": {"experts": 2, "r": 2, "alpha": 4, "use_trainable_adapters": True, "xlora_depth": 2, "xlora_size": 8,
              "layerwise_scalings": True},
    # fresh trainable task experts, top-2 of 3 per token (the gate loss needs sample_labels: tests/methods)
    "meteora": {"experts": 3, "r": 2, "alpha": 4, "top_k": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    # one shared rank-4 LoRA with 3 core experts, core-space router; dropout off (the backends see the same masks)
    "comol": {"r": 4, "num_experts": 3, "alpha": 8, "dropout": 0.0},
    # one LoRA per modality; the row's batch mixes text, image, audio and image+audio samples
    "modality": {"vision_r": 2, "vision_alpha": 4, "speech_r": 2, "speech_alpha": 4},
}
# Rows whose inputs are more than token ids: "batch" builds the row's batch from (model, text batch),
# "base_inputs" what the plain base LM must be fed to see what the model sees, "files" what save writes.
ROW_INPUTS = {
    "modality": {"batch": lambda model, batch: mixed_batch(model, build_tiny_tokenizer()), "base_inputs": base_inputs,
                 "files": ["encoders.safetensors", "manifest.json", "moelora_config.json", "speech-lora", "vision-lora"]},
}
# Text methods' rows as train.py overrides ("method={...}"), with changes a CLI test needs (`overrides`).
TEXT_METHODS = [name for name in METHOD_CASES if name not in ROW_INPUTS]


def method_override(name: str, **overrides) -> str:
    """The row as a train.py command-line override: method={name: ..., key: value, ...} (YAML flow = JSON)."""
    return "method=" + json.dumps({"name": name, **METHOD_CASES[name], **overrides})
