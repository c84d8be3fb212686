"""Pretrained HF encoders behind our projectors (issue 18): tiny random CLIP/SigLIP vision and Whisper audio models
built from configs, saved as safetensors folders, train, save and reload with identical outputs."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moelora
from moelora.base_models import build_tiny_tokenizer, resolve_base_model
from moelora.checkpoint import load_tensors
from moelora.errors import ConfigError
from moelora.model import MoELoRAModel
from moelora.multimodal import EncoderConfig
from moelora.multimodal.pretrained import CLIP_MEAN, PretrainedImageEncoder
from tests.multimodal_batches import mixed_batch
from tests.processes import REPO

sys.path.insert(0, str(REPO))
import train  # noqa: E402

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """{"clip", "siglip", "whisper"}: tiny random HF models saved with safetensors (Whisper: 16 mel bins, not our 40)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).save_pretrained(root / "clip")
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision)).save_pretrained(root / "siglip")
    (root / "siglip/preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    whisper = transformers.WhisperConfig(
        num_mel_bins=16, d_model=16, encoder_layers=1, encoder_attention_heads=2, decoder_layers=1,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=100,
        max_target_positions=16, vocab_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    transformers.WhisperModel(whisper).save_pretrained(root / "whisper")
    return {name: str(root / name) for name in ("clip", "siglip", "whisper")}


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    base, _ = resolve_base_model("tiny-random-llama")
    return moelora.get_moelora_model(base, {"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]},
                                     encoders=cfg)


@pytest.mark.parametrize("trained", [True, False])
def test_pretrained_encoders_train_save_and_reload_identically(trained, hf_folders, tmp_path):
    cfg = EncoderConfig(image_model=hf_folders["clip"], audio_model=hf_folders["whisper"])
    model = _model(cfg)
    model.encoders.set_trainable(encoders=trained, projectors=True)
    model.train()
    assert model.encoders.image.backbone.training == trained  # frozen: no dropout, the folder's features
    backbone = {k: v.clone() for k, v in model.encoders.state_dict().items() if ".backbone." in k}
    batch = mixed_batch(model, build_tiny_tokenizer(), labels=True)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = {k for k, v in model.encoders.state_dict().items() if k in backbone and not torch.equal(v, backbone[k])}
    assert (len(moved) > len(backbone) // 2) if trained else not moved
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")

    saved = load_tensors(tmp_path / "adapter/adapter_model.safetensors")
    assert any(k.startswith("encoders.image.proj.") for k in saved)
    assert any(".backbone." in k for k in saved) == trained  # frozen: the folder has its weights, only the path is saved
    meta = json.loads((tmp_path / "adapter/moelora_config.json").read_text())
    assert meta["encoders"]["image_model"] == hf_folders["clip"]
    assert meta["pretrained_encoders"] == {"image": {"model": hf_folders["clip"], "trained": trained},
                                           "audio": {"model": hf_folders["whisper"], "trained": trained}}
    loaded = MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "adapter")
    with torch.no_grad():
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_images_are_resized_and_normalised_as_the_model_expects(hf_folders):
    images = torch.rand(2, 3, 16, 16)
    for name, mean in (("clip", CLIP_MEAN), ("siglip", (0.5, 0.5, 0.5))):  # no preprocessor file: CLIP's values
        enc = PretrainedImageEncoder(EncoderConfig(image_model=hf_folders[name], image_grid=2), 24, 0.02)
        m = torch.tensor(mean).view(1, 3, 1, 1)
        s = torch.tensor((0.26862954, 0.26130258, 0.27577711) if name == "clip" else (0.5, 0.5, 0.5)).view(1, 3, 1, 1)
        pixels = (F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False) - m) / s
        h = enc.backbone(pixel_values=pixels).last_hidden_state[:, -16:]  # 4x4 patches (CLIP: after its CLS token)
        pooled = F.adaptive_avg_pool2d(h.transpose(1, 2).reshape(2, 16, 4, 4), 2).flatten(2).transpose(1, 2)
        torch.testing.assert_close(enc(images), enc.proj(pooled))


def test_train_py_trains_a_pretrained_encoder_run(hf_folders, tmp_path):
    out = tmp_path / "run"
    train.main(["base_model=tiny-random-llama", "data.suite=multimodal", "data.tasks=[digit_read, spoken_digit]",
                "data.n_train_per_task=4", "data.n_eval_per_task=1", "data.max_length=160", "max_steps=2",
                "per_device_train_batch_size=4", "report_to=[jsonl]", "eval_before_training=false",
                f"encoders.image_model={hf_folders['siglip']}", f"encoders.audio_model={hf_folders['whisper']}",
                "freeze_encoders=false", "encoder_learning_rate=1e-3", "eval_max_new_tokens=2",
                "method={name: lora, r: 2, target_modules: [q_proj]}", f"output_dir={out}"])
    meta = json.loads((out / "adapter/moelora_config.json").read_text())
    assert meta["pretrained_encoders"]["image"] == {"model": hf_folders["siglip"], "trained": True}
    assert any(k.startswith("encoders.audio.backbone.") for k in load_tensors(out / "adapter/adapter_model.safetensors"))
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["trained"]["per_task"]) == {"digit_read", "spoken_digit"}


def test_bad_pretrained_folders_are_one_clear_error(hf_folders, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(Path(hf_folders["clip"], "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "mystery", "auto_map": {"AutoModel": "x.Model"}}))
    (remote / "model.safetensors").write_bytes(Path(hf_folders["clip"], "model.safetensors").read_bytes())
    cases = {tmp_path / "missing": "not found", pickled: "pickle files ['pytorch_model.bin']",
             remote: "does not load with transformers.AutoModel", Path(hf_folders["whisper"]): "not a vision model"}
    for folder, what in cases.items():
        with pytest.raises(ConfigError, match="encoders.image_model") as err:
            _model(EncoderConfig(image_model=str(folder)))
        assert what in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)
    capsys.readouterr()
    code = train.cli(["base_model=tiny-random-llama", "data.suite=multimodal", "data.tasks=[digit_read]",
                      f"encoders.audio_model={pickled}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "encoders.audio_model" in err and "safetensors" in err and len(err.splitlines()) == 1, err


def test_a_relative_folder_is_saved_absolute(hf_folders, monkeypatch, tmp_path):
    """The checkpoint names the folder so that it loads from any working directory."""
    clip = Path(hf_folders["clip"])
    monkeypatch.chdir(clip.parent)
    model = _model(EncoderConfig(image_model="clip"))
    model.save_pretrained(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    meta = json.loads((tmp_path / "adapter/moelora_config.json").read_text())
    assert meta["encoders"]["image_model"] == str(clip.resolve())
    loaded = MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "adapter")
    assert loaded.encoders.config.image_model == str(clip.resolve())
