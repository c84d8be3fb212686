"""train.py end to end on the tiny model: outputs, exact resume, the once-per-step bias, and errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_runs import REPO, TEXT, TINY_RUN, train

TINY = [*TINY_RUN, *TEXT, "data.n_eval_per_task=2", "per_device_eval_batch_size=8", "eval_max_new_tokens=4"]
SMORA = "method={name: smora, r: 8, k: 2, alpha: 4, bias_update_rate: 1.0}"


def _run(tmp, *extra):
    return train.main([*TINY, SMORA, f"output_dir={tmp}", *extra])


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_run_writes_adapter_logs_tables_and_updates_bias_once_per_step(tmp_path):
    out = tmp_path / "run"
    summary = _run(out, "max_steps=2", "gradient_accumulation_steps=4", "report_to=[jsonl, tensorboard]",
                   "eval_strategy=steps", "eval_steps=1")
    assert summary["steps"] == 2
    for name in ("adapter/adapter_model.safetensors", "adapter/manifest.json", "log.jsonl", "eval_results.md",
                 "eval_results.json", "run_config.json"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    records = [r for r in _log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    evals = [r for r in _log(out) if "eval/add" in r]
    assert [r["step"] for r in evals] == [1]  # eval_strategy=steps: every eval_steps, before the end
    assert {"eval/average", "eval/loss", "eval/perplexity"} <= set(evals[0])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "router/load_entropy", "router/dead_experts"} <= set(records[0])
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"base", "trained"} and set(results["base"]["per_task"]) == {"add", "reverse_word", "sort_asc"}
    # u = 1: each optimizer step moves every bias entry by -1, 0 or +1; 2 steps with 4 micro-batches
    # each must leave |beta| <= 2 (8 if it were updated per micro-batch), and integral.
    biases = [v for k, v in load_file(str(out / "adapter/adapter_model.safetensors")).items() if k.endswith(".bias")]
    assert biases and all(float(b.abs().max()) <= 2 and torch.equal(b, b.round()) for b in biases)
    assert any(float(b.abs().max()) > 0 for b in biases)
    manifest = json.loads((out / "adapter/manifest.json").read_text())
    assert manifest["training_config"]["method"]["name"] == "smora" and manifest["metrics"]["steps"] == 2


def test_resume_continues_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["max_steps=6", "eval_before_training=false", "data.n_eval_per_task=0", "gradient_accumulation_steps=2"]
    _run(straight, *common)
    _run(resumed, *common, "save_steps=3", "save_total_limit=5")
    # Throw away everything after step 3, then continue from the checkpoint.
    (resumed / "checkpoint-3").rename(tmp_path / "ckpt3")
    for p in resumed.iterdir():
        subprocess.run(["rm", "-rf", str(p)], check=True)
    (tmp_path / "ckpt3").rename(resumed / "checkpoint-3")
    (resumed / "run_config.json").write_text("{}")
    _run(resumed, *common, "save_steps=3", "resume_from_checkpoint=true")

    want = load_file(str(straight / "adapter/adapter_model.safetensors"))
    got = load_file(str(resumed / "adapter/adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert [r["step"] for r in _log(resumed)] == [4, 5, 6]
    straight_loss = {r["step"]: r["loss"] for r in _log(straight)}
    for r in _log(resumed):
        assert r["loss"] == pytest.approx(straight_loss[r["step"]], abs=1e-6)


def test_output_dir_of_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _run(out, "max_steps=1", "eval_before_training=false", "data.n_eval_per_task=0")
    before = (out / "adapter/adapter_model.safetensors").read_bytes()
    assert train.cli([*TINY, SMORA, f"output_dir={out}", "max_steps=1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "adapter/adapter_model.safetensors").read_bytes() == before


@pytest.mark.parametrize("override,message", [
    ("learning_rat=1e-4", "config key 'learning_rat': unknown key for RunConfig (did you mean 'learning_rate'?)"),
    ("per_device_train_batch_size=eight", "config key 'per_device_train_batch_size': expected an integer"),
    ("method={name: smora, r: 8, k: 16}", "config key 'method.k': must be between 1 and r=8"),
    ("method={name: smoraa}", "unknown method 'smoraa'"),
    ("method.kk=3", "config key 'method.kk': unknown key for SMoRAConfig (did you mean 'k'?)"),
    ("data.train_files=[/nonexistent/train.jsonl]", "/nonexistent/train.jsonl"),
    ("data.tasks=[addition]", "addition"),
    ("base_model=/nonexistent/model", "/nonexistent/model"),
])
def test_bad_input_gives_one_clear_error(tmp_path, capsys, override, message):
    code = train.cli([*TINY, SMORA, f"output_dir={tmp_path / 'x'}", "max_steps=1", override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_cli_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "missing.yaml" in proc.stderr


@pytest.mark.parametrize("text", ["eval_strategy: no", "eval_strategy: 'no'"])
def test_yaml_bare_no_means_the_option_no(tmp_path, text):
    # YAML 1.1 reads a bare `no` as false; for options whose choices include "no" it means "no".
    from moelora.training.run_config import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text(f"base_model: tiny-random-llama\nmethod: {{name: lora}}\n{text}\nmixed_precision: no\n")
    cfg = load_run_config(str(path), ["eval_before_training=no"])
    assert cfg.eval_strategy == "no" and cfg.mixed_precision == "no" and cfg.eval_before_training is False
