"""Nothing is lost: SIGKILL + resume, half-written checkpoints, non-finite steps, collapsed routers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moelora
from moelora.base_models import resolve_base_model
from moelora.training.state import list_checkpoints, resolve_resume
from tests.training.test_train_cli import REPO, SMORA, TINY, _log, _run, train

QUIET = ["eval_before_training=false", "data.n_eval_per_task=0"]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    steps = ["max_steps=30", "save_steps=2", "save_total_limit=3", *QUIET]
    _run(straight, *steps)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, SMORA, f"output_dir={killed}", *steps],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list_checkpoints(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "the run finished before it could be killed"
    assert list_checkpoints(killed)

    _run(killed, *steps, "resume_from_checkpoint=true")
    want = load_file(str(straight / "adapter/adapter_model.safetensors"))
    got = load_file(str(killed / "adapter/adapter_model.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert _log(killed)[-1]["loss"] == pytest.approx(_log(straight)[-1]["loss"], abs=1e-6)


def test_half_written_checkpoints_are_never_resumed(tmp_path):
    out = tmp_path / "run"
    _run(out, "max_steps=4", "save_steps=2", "save_total_limit=5", *QUIET)
    good = resolve_resume(True, out)
    assert good.name == "checkpoint-2"
    # What a kill during a write leaves: a temporary folder, or a folder without its trainer state.
    (out / ".checkpoint-6.tmp-abc").mkdir()
    (out / ".checkpoint-6.tmp-abc" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-8").mkdir()
    (out / "checkpoint-8" / "training_state.safetensors").write_bytes(b"\x00" * 10)
    assert resolve_resume(True, out) == good
    model = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], good / "adapter")
    assert model.adapter_layers()


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = train.cli([*TINY, SMORA, f"output_dir={out}", "max_steps=6", "save_steps=1", *QUIET, "learning_rate=1e30"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: non-finite loss or gradient at step 2" in err and "checkpoint-1" in err
    assert not (out / "adapter").exists()
    ckpt = resolve_resume(True, out)
    assert ckpt.name == "checkpoint-1"
    tensors = load_file(str(ckpt / "adapter/adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_non_finite_steps_can_be_skipped(tmp_path):
    out = tmp_path / "run"
    summary = _run(out, "max_steps=4", *QUIET, "learning_rate=1e30", "nan_policy=skip")
    assert summary["steps"] == 4
    assert _log(out)[-1]["skipped_steps"] >= 1
    tensors = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())  # skipped steps never touched the weights


def test_router_collapse_is_reported_with_layer_names_and_can_stop(tmp_path, capsys):
    # Threshold above the maximum (1.0): every router counts as collapsed, so detection must fire.
    out = tmp_path / "warn"
    _run(out, "max_steps=2", *QUIET, "router_collapse_entropy=1.01")
    assert "model.layers.0.self_attn.q_proj" in _log(out)[0]["router/collapsed_layers"]
    assert "router collapse at step 1" in capsys.readouterr().err
    code = train.cli([*TINY, SMORA, f"output_dir={tmp_path / 'stop'}", "max_steps=2", *QUIET,
                      "router_collapse_entropy=1.01", "router_collapse_stop=true"])
    err = capsys.readouterr().err
    assert code == 2 and "router_collapse_stop" in err and "model.layers.0" in err
