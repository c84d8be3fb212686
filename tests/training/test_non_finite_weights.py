"""Issue 14: non-finite weights are never written and never loaded; nan_policy=skip stops when skipping
cannot help; the non-finite message says what is true for the run's dtype."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelora
from moelora.base_models import resolve_base_model
from moelora.training.state import list_checkpoints
from tests.training.test_train_cli import REPO, SMORA, TINY, train

QUIET = ["eval_before_training=false", "data.n_eval_per_task=0"]


def _cli(capsys, out, *extra):
    code = train.cli([*TINY, SMORA, f"output_dir={out}", *QUIET, *extra])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def _updates_turn_weights_nan(monkeypatch, from_step=1):
    """From optimizer step `from_step` on, the update leaves a NaN in the weights (as an overflowing
    update does: AdamW applies finite gradients, the sum is not finite)."""
    real, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= from_step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_non_finite_weights_stop_even_with_skip_and_no_nan_adapter_is_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, err = _cli(capsys, out, "max_steps=4", "learning_rate=.inf", "nan_policy=skip")
    assert code == 2 and "config key 'learning_rate': must be > 0 and finite, got inf" in err
    code, err = _cli(capsys, out, "max_steps=4", "learning_rate=1e300")  # a float32 overflow in AdamW
    assert code == 2 and "config key 'learning_rate': must be below 3.4e+37" in err, err
    _updates_turn_weights_nan(monkeypatch, from_step=1)
    code, err = _cli(capsys, out, "max_steps=1", "nan_policy=skip")  # the last step: checked before the save
    assert code == 2, err
    assert err.startswith("error: the adapter's weights became non-finite (NaN/inf) in the update of step 1"), err
    code, err = _cli(capsys, out, "max_steps=4", "nan_policy=skip")  # mid-run: read with step 2's check
    assert err.startswith("error: the adapter's weights became non-finite (NaN/inf) in the update of step 1"), err
    assert "skipping steps cannot undo an update" in err
    assert not (out / "adapter").exists()


def test_the_checkpoint_named_as_last_good_is_never_non_finite(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _updates_turn_weights_nan(monkeypatch, from_step=2)
    code, err = _cli(capsys, out, "max_steps=4", "save_steps=1", "save_total_limit=5")
    assert code == 2 and "in the update of step 2" in err and "last good checkpoint: " in err, err
    assert err.split("last good checkpoint: ")[1].startswith(str(out / "checkpoint-1")), err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]  # checkpoint-2 would have held the NaN
    tensors = load_file(str(out / "checkpoint-1" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_skip_stops_after_too_many_non_finite_steps_in_a_row(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _cli(capsys, out, "max_steps=50", "learning_rate=1e30", "warmup_ratio=0", "nan_policy=skip",
                     "nan_max_consecutive_skips=2")
    assert code == 2, err
    assert err.startswith("error: 2 non-finite steps in a row (the last at step 3): the run is diverging"), err
    assert not (out / "adapter").exists()


def test_float16_message_does_not_blame_the_learning_rate(tmp_path, capsys):
    code, err = _cli(capsys, tmp_path / "run", "max_steps=4", "dtype=float16", "learning_rate=1e30")
    assert code == 2 and "non-finite" in err, err
    assert "float16's range ends at 65504" in err and "learning_rate" not in err


# --- saving and loading -------------------------------------------------------------------------------
@pytest.fixture
def nan_adapter(tmp_path):
    """A saved adapter whose weights file was then given a NaN (what old versions wrote after divergence)."""
    model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], moelora.LoRAConfig(r=2),
                                      base_model_id="tiny-random-llama")
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "moelora"})
    return tmp_path / "adapter", key


def test_save_pretrained_refuses_non_finite_weights(tmp_path):
    model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], moelora.LoRAConfig(r=2))
    with torch.no_grad():
        model.trainable_parameters()[0].fill_(float("inf"))
    with pytest.raises(moelora.CheckpointError, match="refusing to save a non-finite adapter"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.iterdir())
    # fp32 weights that overflow float16 when saved in it are refused too
    with torch.no_grad():
        model.trainable_parameters()[0].fill_(1e6)
    with pytest.raises(moelora.CheckpointError, match="non-finite"):
        model.save_pretrained(tmp_path / "adapter", dtype=torch.float16)


def test_non_finite_adapters_are_never_loaded_without_the_override(nan_adapter):
    path, key = nan_adapter

    def base():  # a fresh base model each time: loading injects the adapter layers into it
        return resolve_base_model("tiny-random-llama")[0]

    with pytest.raises(moelora.CheckpointError, match=f"tensor '{key}' holds NaN or infinite values"):
        moelora.MoELoRAModel.from_pretrained(base(), path)
    with pytest.raises(moelora.CheckpointError, match="refusing to load it"):
        moelora.load(path)
    model = moelora.MoELoRAModel.from_pretrained(base(), path, allow_non_finite=True)  # forensics
    assert not torch.isfinite(model.adapter_state_dict()[key]).all()
    fresh = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], moelora.LoRAConfig(r=2))
    with pytest.raises(moelora.CheckpointError, match="holds NaN"):
        fresh.load_adapter_state_dict(load_file(str(path / "adapter_model.safetensors")))


def test_evaluate_refuses_a_non_finite_adapter(nan_adapter, tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    import evaluate

    code = evaluate.cli(["--checkpoint", str(nan_adapter[0]), "--tasks", "add", "--limit-per-task", "1",
                         "--no-base", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip()
    line = next(line for line in err.splitlines() if "error: " in line)  # the progress bar shares stderr
    assert code == 2 and "holds NaN or infinite values" in line and "Traceback" not in err, err
    assert not (tmp_path / "eval").exists()


def test_resume_refuses_a_non_finite_checkpoint(tmp_path, capsys, nan_adapter):
    out = tmp_path / "run"
    train.main([*TINY, SMORA, f"output_dir={out}", *QUIET, "max_steps=2", "save_steps=1"])
    ckpt = out / "checkpoint-1" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(ckpt))
    tensors[sorted(tensors)[0]].fill_(float("nan"))
    save_file(tensors, str(ckpt), metadata={"format": "moelora"})
    before = json.loads((out / "run_config.json").read_text())
    capsys.readouterr()
    code = train.cli([*TINY, SMORA, f"output_dir={out}", *QUIET, "max_steps=2",
                      f"resume_from_checkpoint={out / 'checkpoint-1'}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "holds NaN or infinite values" in err, err
    assert json.loads((out / "run_config.json").read_text()) == before
