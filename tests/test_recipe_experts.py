"""scripts/recipe_experts.sh end to end on the tiny Llama: experts -> LoRA-Mixer, X-LoRA, joint stages 1 -> 2."""

import json
import os
import subprocess
import sys

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from tests.processes import REPO

TASKS = ["add", "sort_asc"]


@pytest.mark.slow
def test_recipe_trains_experts_then_routers_over_them(tmp_path):
    env = dict(os.environ, BASE="tiny-random-llama", TASKS=" ".join(TASKS), OUT=str(tmp_path), EXPERT_STEPS="2",
               ROUTER_STEPS="2", PYTHON=sys.executable,
               EXTRA="eval_before_training=false data.n_train_per_task=8 data.n_eval_per_task=2 "
                     "per_device_train_batch_size=4 per_device_eval_batch_size=4 eval_max_new_tokens=2 "
                     "report_to=[jsonl] logging_steps=1 save_steps=0")
    done = subprocess.run(["bash", str(REPO / "scripts" / "recipe_experts.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    for task in TASKS:  # each expert is a PEFT LoRA folder on q/k/v/o
        cfg = json.loads((tmp_path / "experts" / task / "adapter" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    loaded = {}
    for run, method in [("lora_mixer", "lora_mixer"), ("xlora", "xlora"), ("mixer_stage1", "lora_mixer"),
                        ("mixer_stage2", "lora_mixer")]:
        model = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0],
                                                     tmp_path / run / "adapter")
        assert model.method_config.method_name == method and model.method_config.expert_names == TASKS
        loaded[run] = model
    # The plug-and-play mixer's experts are the PEFT experts, untouched; its log shows the router-loss terms.
    expert = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0],
                                                  tmp_path / "experts" / "add" / "adapter")
    q = "model.layers.0.self_attn.q_proj"
    A, B = loaded["lora_mixer"].adapter_layers()[q].expert_factors(0)
    assert torch.equal(A, expert.adapter_layers()[q].lora_A) and torch.equal(B, expert.adapter_layers()[q].lora_B)
    log = [json.loads(line) for line in (tmp_path / "lora_mixer" / "log.jsonl").read_text().splitlines()]
    assert all("aux/balance" in r and "aux/entropy" in r for r in log)
    # Stage 2 started from stage 1's experts and kept them frozen.
    s1, s2 = loaded["mixer_stage1"].adapter_layers()[q], loaded["mixer_stage2"].adapter_layers()[q]
    assert torch.equal(s1.lora_B, s2.lora_B) and s1.lora_B.abs().sum() > 0
    assert not torch.equal(s1.router, s2.router)
