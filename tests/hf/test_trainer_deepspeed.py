"""`transformers.Trainer` with DeepSpeed ZeRO-2/3 (CPU accelerator, one process over gloo, `accelerate launch` as
tests/training/test_distributed.py): nothing added to the user's script.

DeepSpeed's optimizer steps flat partitions, not the model's parameters, so moelora's optimizer hook finds the
Trainer on the call stack and adds MoELoRACallback (router state once per optimizer step). Under ZeRO-3 the
Trainer checkpoint is the adapter only, as without DeepSpeed (the engine would gather the whole base, tied
embeddings included, which safetensors refuses). Trainer's resume through DeepSpeed's own checkpoint works.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moelora
from tests.hf.test_trainer import tied_llama

pytest.importorskip("deepspeed")
REPO = Path(__file__).resolve().parents[2]
SMORA = {"name": "smora", "r": 8, "k": 2, "alpha": 4}
SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import Trainer, TrainingArguments
    import moelora
    from tests.hf.test_trainer import _count_router_updates, rows, tied_llama
    out, ds_json = sys.argv[1], sys.argv[2]

    def run(folder, resume=None):
        torch.manual_seed(0)
        model = moelora.get_moelora_model(tied_llama(), {config!r})
        updates = _count_router_updates(model)
        args = TrainingArguments(output_dir=folder, report_to="none", max_steps=2, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, logging_steps=1, save_steps=1, learning_rate=1e-2,
                                 disable_tqdm=True, deepspeed=ds_json)
        trainer = Trainer(model=model, args=args, train_dataset=rows())  # no callback added by hand
        trainer.train(resume_from_checkpoint=resume)
        return trainer, updates

    trainer, updates = run(out + "/run")
    callbacks = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    run(out + "/resumed", resume=out + "/run/checkpoint-1")
    if trainer.is_world_process_zero():
        json.dump({{"updates": len(updates), "callbacks": callbacks}}, open(out + "/result.json", "w"))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_trainer_under_deepspeed_needs_no_callback_and_checkpoints_the_adapter(tmp_path, zero):
    (tmp_path / "run.py").write_text(SCRIPT.format(config=SMORA))
    ds_json = str(REPO / f"configs/deepspeed/zero{zero}.json")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", "1", "--main_process_port", str(_free_port()),
           "--use_deepspeed", "--deepspeed_config_file", ds_json, str(tmp_path / "run.py"), str(tmp_path), ds_json]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert "MoELoRACallback" in result["callbacks"]
    assert result["updates"] == 2  # router state once per optimizer step (2 steps x 2 micro-batches)

    ckpt = tmp_path / "run" / "checkpoint-2"
    fresh = moelora.get_moelora_model(tied_llama(), SMORA)
    trainer_state = load_file(str(ckpt / "model.safetensors"))
    assert {k: v.shape for k, v in trainer_state.items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    trained = moelora.MoELoRAModel.from_pretrained(tied_llama(), ckpt).adapter_state_dict()
    assert any(k.endswith(".bias") and v.abs().max() > 0 for k, v in trained.items())  # beta moved
    assert any(not torch.equal(v, fresh.adapter_state_dict()[k]) for k, v in trained.items() if "lora_B" in k)
    resumed = moelora.MoELoRAModel.from_pretrained(tied_llama(), tmp_path / "resumed" / "checkpoint-2")
    for key, value in resumed.adapter_state_dict().items():  # resumed from checkpoint-1 = uninterrupted
        torch.testing.assert_close(value, trained[key], atol=1e-6, rtol=1e-5)
