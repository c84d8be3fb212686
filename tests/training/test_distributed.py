"""Data parallel on CPU: `accelerate launch` with 2 processes (gloo) is the same training as 1 process.

2 processes x batch b must match 1 process x batch 2b: the loss is a token mean over the whole
optimizer step on all processes, routers update from all-reduced counts, and every process ends with
identical router state (train.py checks that before saving). Tolerance: losses to 1e-5 relative;
adapter weights to 1e-3 absolute, because Adam's update divides by sqrt(v), which turns the last-bit
differences of a different summation order into ~1e-4 changes on near-zero gradients.
"""

import json

import pytest
from safetensors.torch import load_file

from tests.method_cases import TEXT_METHODS as SHARED_TEXT_METHODS
from tests.method_cases import method_override
from tests.processes import REPO, accelerate_launch, run

ARGS = ["base_model=tiny-random-llama", "max_steps=4", "data.tasks=[add, sort_asc]", "data.n_train_per_task=40",
        "data.n_eval_per_task=0", "eval_before_training=false", "report_to=[jsonl]", "logging_steps=1",
        "learning_rate=1e-2", "method={name: smora, r: 8, k: 2, bias_update_rate: 1.0}"]


def launch(out, processes, *extra, zero=None):
    ds_json = None
    if zero is not None:  # the launcher and train.py read the same DeepSpeed JSON
        ds_json = str(REPO / f"configs/deepspeed/zero{zero}.json")
        extra = (*extra, f"deepspeed={ds_json}")
    return run(accelerate_launch(processes, REPO / "train.py", *ARGS, f"output_dir={out}", *extra,
                                 deepspeed_json=ds_json))


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    launch(tmp_path / "one", 1, "per_device_train_batch_size=4")
    launch(tmp_path / "two", 2, "per_device_train_batch_size=2")
    for a, b in zip(_log(tmp_path / "one"), _log(tmp_path / "two")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    one = load_file(str(tmp_path / "one/adapter/adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two/adapter/adapter_model.safetensors"))
    for key in one:
        if key.endswith(".bias"):  # integer-valued with u = 1: must be exactly equal
            assert (one[key] == two[key]).all(), key
        else:
            assert float((one[key] - two[key]).abs().max()) < 1e-3, key
    assert any(float(v.abs().max()) > 0 for k, v in two.items() if k.endswith(".bias"))


@pytest.mark.slow
def test_fp16_gradient_all_reduce_is_close_to_exact(tmp_path):
    """ddp_comm_hook=fp16 rounds the all-reduced gradients to fp16: the first loss (before any update) is
    identical, later ones differ (the hook is active) but stay within 1% of the exact 2-process run."""
    launch(tmp_path / "exact", 2, "per_device_train_batch_size=2")
    launch(tmp_path / "fp16", 2, "per_device_train_batch_size=2", "ddp_comm_hook=fp16")
    exact = [r["loss"] for r in _log(tmp_path / "exact") if "loss" in r]
    fp16 = [r["loss"] for r in _log(tmp_path / "fp16") if "loss" in r]
    assert len(exact) == len(fp16) == 4 and fp16[0] == exact[0]
    assert fp16 != exact
    assert fp16 == pytest.approx(exact, rel=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_zero_two_processes(tmp_path, zero):
    """ZeRO-2/3 with 2 CPU processes: same losses as plain data parallel, full (unsharded) adapter tensors
    in checkpoints and final adapter, and the ZeRO-3 adapter loads in a single process."""
    import torch

    import moelora
    from moelora.base_models import resolve_base_model

    launch(tmp_path / "ddp", 2, "per_device_train_batch_size=2")
    launch(tmp_path / "zero", 2, "per_device_train_batch_size=2", "save_steps=2", zero=zero)
    for a, b in zip(_log(tmp_path / "ddp"), _log(tmp_path / "zero")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)

    reference = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0],
                                          moelora.SMoRAConfig(r=8, k=2)).adapter_state_dict()
    for folder in ("zero/adapter", "zero/checkpoint-2/adapter"):
        tensors = load_file(str(tmp_path / folder / "adapter_model.safetensors"))
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in reference.items()}, folder

    batch = {"input_ids": torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))}
    logits = {}
    for name in ("ddp", "zero"):
        model = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0],
                                                     tmp_path / name / "adapter")
        with torch.no_grad():
            logits[name] = model(**batch).logits
    torch.testing.assert_close(logits["zero"], logits["ddp"], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_an_expert_without_tokens_on_one_process_does_not_hang(tmp_path):
    """k=1 of 8 ranks with one example per process: some ranks get no token on a process in a step.
    Every adapter parameter still takes part in every forward (dense shrink/expand with zero gates) and
    routers all-reduce every count, so no collective waits for a process that skipped an expert."""
    launch(tmp_path / "run", 2, "per_device_train_batch_size=1", "method={name: smora, r: 8, k: 1}",
           zero=3)
    dead = [r for r in _log(tmp_path / "run") if r.get("router/dead_layers")]
    assert dead, "expected experts without tokens on the main process"


# Every routed text method of the shared list (smora's data-parallel tests are above; plain LoRA has no router).
CLI_CHANGES = {
    "xlora": {"xlora_dropout_p": 0.0},  # classifier dropout off: its random masks differ between 1 and 2 processes
    # Experts named after the tasks, so every sample has a gate-loss target: the gate CE at lambda 50 (a mean per
    # sample, then over the samples) must train 2 processes x 2 as 1 x 4.
    "meteora": {"experts": ["add", "sort_asc", "copy"]},
}
TEXT_METHODS = {name: method_override(name, **CLI_CHANGES.get(name, {}))
                for name in SHARED_TEXT_METHODS if name not in ("lora", "smora")}


@pytest.mark.slow
@pytest.mark.parametrize("method", TEXT_METHODS)
def test_every_text_method_trains_data_parallel_like_one_process(tmp_path, method):
    """The other routed methods under 2 CPU processes: same per-step losses as 1 process x double batch."""
    launch(tmp_path / "one", 1, "per_device_train_batch_size=4", TEXT_METHODS[method])
    launch(tmp_path / "two", 2, "per_device_train_batch_size=2", TEXT_METHODS[method])
    for a, b in zip(_log(tmp_path / "one"), _log(tmp_path / "two")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert (tmp_path / "two/adapter/adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_multimodal_training_with_a_text_only_process(tmp_path):
    """One example per process from a text task and an image task: the process whose batch holds no
    image gives the image encoder no gradient, which plain DDP rejects; train.py must cope."""
    launch(tmp_path / "run", 2, "per_device_train_batch_size=1", "data.suite=multimodal",
           "data.tasks=[add, digit_read]", "data.n_train_per_task=6", "data.max_length=160",
           "encoders.image_width=16", "encoders.audio_width=16",
           "method={name: modality, vision_r: 2, vision_alpha: 4, speech_r: 2, speech_alpha: 4}")
    assert len(_log(tmp_path / "run")) == 4


@pytest.mark.slow
def test_multimodal_with_zero3_and_a_text_only_process(tmp_path):
    """ZeRO-3 gathers an encoder's shards on every process that runs it, together: the process whose batch
    has no image still runs the image encoder (on a blank input, adding exactly zero), so nothing hangs,
    and the saved encoders are full tensors that load in one process. Evaluation (every process generates
    in lockstep) does not hang either."""
    import moelora

    launch(tmp_path / "run", 2, "per_device_train_batch_size=1", "data.suite=multimodal",
           "data.tasks=[add, digit_read]", "data.n_train_per_task=6", "data.max_length=160",
           "encoders.image_width=16", "encoders.audio_width=16",
           "method={name: modality, vision_r: 2, vision_alpha: 4, speech_r: 2, speech_alpha: 4}",
           "data.n_eval_per_task=1", "eval_before_training=true", zero=3)  # evaluation under ZeRO-3 too
    assert len(_log(tmp_path / "run")) == 4
    scores = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert set(scores) == {"base", "trained"} and set(scores["trained"]["per_task"]) == {"add", "digit_read"}
    model, _ = moelora.load(tmp_path / "run" / "adapter")
    assert model.encoders.image.conv[0].weight.shape == (16, 3, 3, 3)


def test_a_blank_encoder_pass_changes_nothing(tiny_llama):
    """With run_every_encoder, a text-only batch runs both encoders yet gives the same loss, and their
    weights get (zero) gradients: they took part in the step."""
    import torch

    from moelora.model import get_moelora_model
    from moelora.multimodal.encoders import EncoderConfig

    base, _ = tiny_llama
    model = get_moelora_model(base, {"name": "lora", "r": 2, "target_modules": ["q_proj"]}, encoders=EncoderConfig())
    ids = torch.randint(3, 200, (2, 6))
    plain = model(input_ids=ids, labels=ids).loss
    model.run_every_encoder = True
    every = model(input_ids=ids, labels=ids).loss
    every.backward()
    assert torch.equal(plain, every)
    grads = [p.grad for p in model.encoders.parameters()]
    assert all(g is not None for g in grads) and all(float(g.abs().sum()) == 0 for g in grads)
