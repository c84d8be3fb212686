"""train.py on the real SmolLM2-135M-Instruct for a few steps, then the one-call `moelora.load`."""

import subprocess
import sys

import pytest
import torch

import moelora
from tests.processes import REPO


@pytest.mark.integration
def test_train_py_runs_on_smollm2_and_loads_in_one_call(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/smora.yaml"),
           f"output_dir={out}", "max_steps=2", "data.tasks=[add, sort_asc]", "data.n_train_per_task=16",
           "data.n_eval_per_task=2", "per_device_train_batch_size=2", "per_device_eval_batch_size=4",
           "eval_max_new_tokens=4", "save_steps=0", "logging_steps=1", "report_to=[jsonl]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| average |" in proc.stdout

    model, tokenizer = moelora.load(out / "adapter")
    assert model.method_config.method_name == "smora" and len(model.adapter_layers()) == 30 * 7
    ids = tokenizer("What is 2 + 3?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    assert any(s["tokens"] > 0 for s in model.router_stats().values())
