"""train.py's staged training, freezing switches and per-part learning rates (issue 18): exactly the named parts
change. Every saved tensor of a short run is compared with the run's initial model (rebuilt from the seed)."""

import json
from pathlib import Path

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from moelora.checkpoint import load_tensors
from moelora.multimodal.encoders import part_of

from tests.tiny_runs import MULTIMODAL, TINY_RUN, train

TINY = [
    *TINY_RUN, *MULTIMODAL, "data.tasks=[digit_read, spoken_digit, digit_audio_match]", "data.n_train_per_task=4",
    "data.n_eval_per_task=0", "warmup_ratio=0", "lr_scheduler_type=constant", "encoders.image_width=8",
    "encoders.audio_width=8", "eval_before_training=false", "eval_strategy=no",
    "method={name: lora, r: 2, alpha: 4, target_modules: [q_proj, v_proj]}", "max_steps=3",
]


def _part(key: str) -> str:
    return part_of(key.split(".", 2)[2]) if key.startswith("encoders.") else "adapters"


def _initial_state(out: Path) -> dict[str, torch.Tensor]:
    """The run's model before its first step: train.py seeds, builds the base and the adapter, then the encoders
    on their own seeded stream."""
    from accelerate.utils import set_seed

    from moelora.multimodal.model import attach_seeded_encoders

    saved = json.loads((out / "adapter/moelora_config.json").read_text())
    set_seed(42)
    base, _ = resolve_base_model("tiny-random-llama")
    model = moelora.get_moelora_model(base, moelora.config_from_dict(saved["config"]))
    attach_seeded_encoders(model, moelora.multimodal.EncoderConfig.from_dict(saved["encoders"]), 42)
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def _changed_parts(out: Path, before=None) -> dict[str, set[bool]]:
    """{part: {changed?, ...}} over every saved tensor: {True} = all changed, {False} = none did."""
    before = _initial_state(out) if before is None else before
    after = load_tensors(out / "adapter/adapter_model.safetensors")
    assert after.keys() == before.keys()
    parts: dict[str, set[bool]] = {}
    for key, value in after.items():
        parts.setdefault(_part(key), set()).add(not torch.equal(value, before[key]))
    return parts


@pytest.mark.parametrize("switches, trains", [
    (["stage=align"], {"encoders", "projectors"}),
    (["freeze_encoders=true"], {"projectors", "adapters"}),
    (["freeze_projectors=true"], {"encoders", "adapters"}),
    (["freeze_adapters=true"], {"encoders", "projectors"}),
    ([], {"encoders", "projectors", "adapters"}),
])
def test_exactly_the_named_parts_change(switches, trains, tmp_path):
    out = tmp_path / "run"
    train.main([*TINY, *switches, f"output_dir={out}"])
    parts = _changed_parts(out)
    assert set(parts) == {"encoders", "projectors", "adapters"}
    assert {part for part, changed in parts.items() if changed == {True}} == trains
    assert {part for part, changed in parts.items() if changed == {False}} == set(parts) - trains


def test_align_runs_the_lm_without_adapters():
    """In the align stage the adapters are off in the forward pass, not only frozen: with nonzero adapters the
    loss is the base LM's on the projected features (what the encoders see), and the adapters get no gradient."""
    from moelora.base_models import build_tiny_tokenizer
    from moelora.training.parts import configure_parts, parameter_groups
    from moelora.training.run_config import load_run_config
    from tests.conftest import randomize_adapters
    from tests.multimodal_batches import mixed_batch

    cfg = load_run_config(None, [*TINY, "stage=align"])
    torch.manual_seed(0)
    model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], cfg.method_config,
                                      encoders=cfg.encoders)
    randomize_adapters(model)
    batch = mixed_batch(model, build_tiny_tokenizer(), labels=True)
    joint = model(**batch).loss
    configure_parts(model, cfg)
    aligned = model(**batch).loss
    aligned.backward()
    layers = model.adapter_layers().values()
    for layer in layers:
        layer.adapter_enabled = True
    with torch.no_grad():  # the reference: encoders on, every adapter layer computing only its base linear
        for layer in layers:
            layer.lora_B.zero_()
        reference = model(**batch).loss
    assert not torch.isclose(joint, aligned) and torch.equal(aligned.detach(), reference)
    assert all(p.grad is None and not p.requires_grad for layer in layers for n, p in layer.named_parameters()
               if not n.startswith("base_layer."))
    assert [g["name"] for g in parameter_groups(model, cfg.learning_rate)] == ["encoders", "projectors"]


def test_second_stage_starts_from_the_align_run(tmp_path):
    align, tune = tmp_path / "align", tmp_path / "tune"
    train.main([*TINY, "stage=align", f"output_dir={align}"])
    aligned = load_tensors(align / "adapter/adapter_model.safetensors")
    # stage 2: adapters train, encoders and projectors stay exactly as aligned (frozen after loading them)
    train.main([*TINY, f"init_encoders_from={align}", "freeze_encoders=true", "freeze_projectors=true",
                f"output_dir={tune}"])
    tuned = load_tensors(tune / "adapter/adapter_model.safetensors")
    for key, value in tuned.items():
        if key.startswith("encoders."):
            assert torch.equal(value, aligned[key]), key
    initial = _initial_state(tune)
    assert all(not torch.equal(tuned[k], initial[k]) for k in tuned if not k.startswith("encoders."))
    assert sum(not torch.equal(aligned[k], initial[k]) for k in aligned if k.startswith("encoders.")) > 0


def test_per_part_learning_rates_land_in_the_optimizer_groups(tmp_path):
    out = tmp_path / "run"
    train.main([*TINY, "learning_rate=1e-3", "encoder_learning_rate=1e-4", "projector_learning_rate=3e-3",
                "lr_scheduler_type=linear", "max_steps=4", "save_steps=2", "save_total_limit=1", f"output_dir={out}"])
    groups = json.loads((out / "checkpoint-2/trainer_state.json").read_text())["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["adapters", "encoders", "projectors"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 1e-4, 3e-3]
    # the linear schedule scales every group alike: half-way through, each group is at half its rate
    assert [g["lr"] for g in groups] == pytest.approx([5e-4, 5e-5, 1.5e-3])
    model = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], out / "adapter")
    sizes = {name: sum(p.numel() for _, p in params) for name, params in model.encoders.named_part_parameters().items()}
    counts = [len(g["params"]) for g in groups]
    assert counts[1] == len(model.encoders.named_part_parameters()["encoders"]) and sizes["encoders"] > 0
    assert counts[2] == len(model.encoders.named_part_parameters()["projectors"])



def test_every_group_rate_is_logged_by_name(tmp_path):
    """"lr" is the adapters' rate; with several groups each rate is logged too (the first group's alone
    mislabels an align run with per-modality rates)."""
    out = tmp_path / "run"
    train.main([*TINY, "learning_rate=1e-3", "encoder_learning_rate={image: 3e-3}", "projector_learning_rate=2e-4",
                "logging_steps=1", f"output_dir={out}"])
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert {k: v for k, v in first.items() if k.startswith("lr")} == pytest.approx(
        {"lr": 1e-3, "lr/adapters": 1e-3, "lr/encoders.image": 3e-3, "lr/encoders.audio": 1e-3, "lr/projectors": 2e-4})
    align = tmp_path / "align"
    train.main([*TINY, "stage=align", "learning_rate=1e-3", "logging_steps=1", f"output_dir={align}"])
    first = json.loads((align / "log.jsonl").read_text().splitlines()[0])
    assert {k: v for k, v in first.items() if k.startswith("lr")} == pytest.approx(
        {"lr": 1e-3, "lr/encoders": 1e-3, "lr/projectors": 1e-3})
    plain = tmp_path / "plain"
    train.main([*TINY[:-1], "max_steps=1", "method={name: lora, r: 2, alpha: 4, target_modules: [q_proj]}",
                "freeze_encoders=true", "freeze_projectors=true", "logging_steps=1", f"output_dir={plain}"])
    first = json.loads((plain / "log.jsonl").read_text().splitlines()[0])
    assert [k for k in first if k.startswith("lr")] == ["lr"]  # one group: one rate, as before


def test_per_modality_learning_rates_split_the_groups(tmp_path):
    """{image: r, audio: r'}: each modality's encoder (or projector) is its own group at its own rate; a modality
    left out of the mapping trains at learning_rate; a part given one rate stays one group."""
    out = tmp_path / "run"
    train.main([*TINY, "learning_rate=1e-3", "encoder_learning_rate={image: 3.0e-3, audio: 1.0e-4}",
                "projector_learning_rate={image: 2.0e-3}", "max_steps=3", "save_steps=2", f"output_dir={out}"])
    groups = json.loads((out / "checkpoint-2/trainer_state.json").read_text())["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["adapters", "encoders.image", "encoders.audio", "projectors.image",
                                           "projectors.audio"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 3e-3, 1e-4, 2e-3, 1e-3]
    model = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], out / "adapter")
    named = model.encoders.named_part_parameters()
    for group in groups[1:]:
        part, kind = group["name"].split(".")
        assert len(group["params"]) == sum(n.startswith(f"{kind}.") for n, _ in named[part]) > 0, group["name"]


@pytest.mark.parametrize("overrides, names", [
    (["init_encoders_from={tmp}/missing"], ["init_encoders_from", "not found"]),
    (["init_encoders_from={tmp}/align", "encoders.image_width=16"], ["init_encoders_from", "image_width"]),
    (["init_encoders_from={tmp}/text"], ["init_encoders_from", "no moelora adapter"]),
    (["data.suite=text", "stage=align"], ["stage", "multimodal"]),
    (["stage=align", "freeze_encoders=true", "freeze_projectors=true"], ["stage", "nothing"]),
    (["encoder_learning_rate=-1"], ["encoder_learning_rate", "> 0"]),
    (["encoder_learning_rate={{image: 1.0e-3, video: 1.0e-3}}"], ["encoder_learning_rate", "video", "image, audio"]),
    (["projector_learning_rate={{audio: 0}}"], ["projector_learning_rate.audio", "> 0"]),
    (["encoder_learning_rate={{}}"], ["encoder_learning_rate", "empty"]),
    (["data.suite=text", "encoder_learning_rate={{image: 1.0e-3}}"], ["encoder_learning_rate", "multimodal"]),
])
def test_bad_stage_inputs_are_one_line(overrides, names, tmp_path, capsys):
    if "align" in overrides[0]:
        train.main([*TINY, "stage=align", "max_steps=1", f"output_dir={tmp_path / 'align'}"])
    (tmp_path / "text").mkdir()
    capsys.readouterr()
    code = train.cli([*TINY, *[o.format(tmp=tmp_path) for o in overrides], f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert all(n in err for n in names), err


def test_init_encoders_across_methods(tmp_path):
    """A modality-routing run's encoders (encoders.safetensors, with a vision-speech projector) start a LoRA run,
    and a LoRA run's start a modality run (its extra projector begins as a copy of the speech projector)."""
    from moelora.multimodal import EncoderConfig
    from moelora.multimodal.transfer import load_encoders_from

    cfg = EncoderConfig(image_width=8, audio_width=8)
    base = lambda: resolve_base_model("tiny-random-llama")[0]  # noqa: E731
    torch.manual_seed(1)
    modality = moelora.get_moelora_model(base(), {"name": "modality", "vision_r": 2, "speech_r": 2}, encoders=cfg)
    modality.save_pretrained(tmp_path / "modality")
    torch.manual_seed(2)
    lora = moelora.get_moelora_model(base(), {"name": "lora", "r": 2}, encoders=cfg)
    assert load_encoders_from(lora, str(tmp_path / "modality")) == len(lora.encoders.state_dict())
    theirs = modality.encoders.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in lora.encoders.state_dict().items())
    lora.save_pretrained(tmp_path / "lora")
    torch.manual_seed(3)
    fresh = moelora.get_moelora_model(base(), {"name": "modality", "vision_r": 2, "speech_r": 2}, encoders=cfg)
    load_encoders_from(fresh, str(tmp_path / "lora"))
    got, want = fresh.encoders.state_dict(), lora.encoders.state_dict()
    for key, value in got.items():
        source = key.replace("proj_vision_speech.", "proj.")
        assert torch.equal(value, want[source]), key
