"""train.py on the multimodal suite: every method of tests/method_cases.py trains with encoders, evaluates per
task and saves; modality routing resumes exactly."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import moelora
from moelora.checkpoint import load_tensors

from tests.tiny_runs import MULTIMODAL, REPO, TINY_RUN, train  # noqa: E402
from tests.method_cases import METHOD_CASES, method_override  # noqa: E402

TASKS = ["digit_read", "spoken_digit", "digit_audio_match", "add"]  # vision, speech, vision+speech, text
TINY = [
    *TINY_RUN, *MULTIMODAL, f"data.tasks=[{', '.join(TASKS)}]", "data.n_train_per_task=6", "data.n_eval_per_task=2",
    "per_device_eval_batch_size=8", "eval_max_new_tokens=3", "encoders.image_width=16", "encoders.audio_width=16",
]
# Every row of the one method list (tests/method_cases.py): any method's model owns encoders (X-LoRA's own
# two-cache decoding prefills from them too), so each trains, is evaluated per task and reloads here.
METHODS = {name: method_override(name) for name in METHOD_CASES}
# The shipped configs that train on the multimodal suite (the SmolLM2 smoke runs those).
SHIPPED_MULTIMODAL = [name for name in METHOD_CASES
                      if (yaml.safe_load((REPO / f"configs/{name}.yaml").read_text()).get("data") or {}).get("suite")
                      == "multimodal"]


@pytest.mark.parametrize("method", METHODS)
def test_trains_on_the_multimodal_suite_and_reports_every_task(method, tmp_path):
    out = tmp_path / "run"
    summary = train.main([*TINY, METHODS[method], f"output_dir={out}", "max_steps=2"])
    assert summary["steps"] == 2 and summary["final_loss"] is not None
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"base", "trained"}
    assert set(results["trained"]["per_task"]) == set(TASKS)
    assert all(n == 2 for n in results["trained"]["n"].values())
    model = moelora.MoELoRAModel.from_pretrained(moelora.base_models.resolve_base_model("tiny-random-llama")[0],
                                                 out / "adapter")
    assert model.method_config.method_name == method and model.encoder_config.image_width == 16
    # the encoders trained with the adapters: rebuild the run's initial model (same seed) and compare
    from accelerate.utils import set_seed

    set_seed(42)
    cfg = moelora.config_from_dict(json.loads((out / "adapter/moelora_config.json").read_text())["config"])
    init = moelora.get_moelora_model(moelora.base_models.resolve_base_model("tiny-random-llama")[0], cfg,
                                     encoders=model.encoder_config).adapter_state_dict()
    saved = {k: v for k, v in model.adapter_state_dict().items() if k.startswith("encoders.")}
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    assert sum(not torch.equal(v, init[k]) for k, v in saved.items()) > len(saved) // 2
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert len(losses) == 2 and all(l == l for l in losses)  # noqa: E741 (finite, logged per step)


def test_modality_resume_continues_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*TINY, METHODS["modality"], "max_steps=3", "eval_before_training=false", "data.n_eval_per_task=0"]
    train.main([*common, f"output_dir={straight}"])
    train.main([*common, f"output_dir={resumed}", "save_steps=2"])
    shutil.rmtree(resumed / "adapter")  # keep only the step-2 checkpoint (PEFT folders + encoders), then continue
    train.main([*common, f"output_dir={resumed}", "save_steps=2", "resume_from_checkpoint=true"])
    for part in ("encoders.safetensors", "vision-lora/adapter_model.safetensors", "speech-lora/adapter_model.safetensors"):
        want, got = load_tensors(straight / "adapter" / part), load_tensors(resumed / "adapter" / part)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_routing_by_modality_needs_the_multimodal_suite(tmp_path, capsys):
    code = train.cli(["base_model=tiny-random-llama", METHODS["modality"], f"output_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "data.suite" in err and "multimodal" in err and len(err.splitlines()) == 1


@pytest.mark.integration
@pytest.mark.parametrize("method", SHIPPED_MULTIMODAL)
def test_smollm2_multimodal_smoke(method, tmp_path):
    """A few steps of the shipped config on the real SmolLM2-135M, then the one-call `moelora.load`."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / f"configs/{method}.yaml"),
           f"output_dir={out}", "max_steps=2", f"data.tasks=[{', '.join(TASKS)}]", "data.n_train_per_task=4",
           "data.n_eval_per_task=1", "per_device_train_batch_size=2", "per_device_eval_batch_size=4",
           "eval_max_new_tokens=3", "save_steps=0", "logging_steps=1", "report_to=[jsonl]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| digit_audio_match |" in proc.stdout
    model, tokenizer = moelora.load(out / "adapter")
    assert model.method_config.method_name == method and len(model.adapter_layers()) == 30 * 7
    assert model.media_tokens == {"image": 4, "audio": 8}


def test_a_method_with_its_own_forward_trains_on_the_multimodal_suite(tmp_path):
    """LoRA-Mixer (own forward, balance loss) was refused on images/audio before encoders became a component."""
    from tests.method_cases import method_override

    out = tmp_path / "run"
    summary = train.main([*TINY, method_override("lora_mixer"), f"output_dir={out}", "max_steps=2",
                          "eval_before_training=false"])
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["trained"]["per_task"]) == set(TASKS)
    model = moelora.MoELoRAModel.from_pretrained(moelora.base_models.resolve_base_model("tiny-random-llama")[0],
                                                 out / "adapter")
    assert type(model).__name__ == "LoRAMixerModel" and model.encoder_config.image_width == 16
