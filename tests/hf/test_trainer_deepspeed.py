"""`transformers.Trainer` with DeepSpeed ZeRO-2/3 (CPU accelerator, one process over gloo, `accelerate launch` as
tests/training/test_distributed.py): nothing added to the user's script.

DeepSpeed's optimizer steps flat partitions, not the model's parameters, so moelora's optimizer hook finds the
Trainer on the call stack and adds MoELoRACallback (router state once per optimizer step). Under ZeRO-3 the
Trainer checkpoint is the adapter only, as without DeepSpeed (the engine would gather the whole base, tied
embeddings included, which safetensors refuses). Trainer's resume through DeepSpeed's own checkpoint works.
"""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moelora
from tests.hf.test_trainer import tied_llama
from tests.processes import REPO, accelerate_launch, run

pytest.importorskip("deepspeed")
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


def _launch(script: str, out: Path, zero: int) -> None:
    """`script` (argv: out, the DeepSpeed JSON) under `accelerate launch` with ZeRO stage `zero`, one process."""
    (out / "run.py").write_text(script)
    ds_json = str(REPO / f"configs/deepspeed/zero{zero}.json")
    run(accelerate_launch(1, out / "run.py", out, ds_json, deepspeed_json=ds_json))


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_trainer_under_deepspeed_needs_no_callback_and_checkpoints_the_adapter(tmp_path, zero):
    _launch(SCRIPT.format(config=SMORA), tmp_path, zero)
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


WORDS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    from transformers import Trainer, TrainingArguments
    import datasets, moelora
    from moelora.base_models import build_tiny_tokenizer
    from moelora.data.media import MultimodalCollator, encode_multimodal_examples
    from moelora.data.multimodal import build_multimodal_suite
    from moelora.multimodal import EncoderConfig
    from moelora.multimodal.pretraining import pretrain_encoders
    from tests.hf.test_trainer import tied_llama
    out, ds_json = sys.argv[1], sys.argv[2]

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = moelora.get_moelora_model(tied_llama(), {config!r}, encoders=EncoderConfig(**{encoders!r}))
    train_set, eval_set = build_multimodal_suite(["digit_read", "spoken_digit"], 6, 4, seed=0)
    pretrain_encoders(model.encoders, train_set, eval_set, steps=3, seed=0, tokenizer=tok)
    model.encoders.requires_grad_(False)
    probe = torch.stack(eval_set[0]["images"])
    with torch.no_grad():
        before = model.encoders.image(probe)
    rows = encode_multimodal_examples(tok, train_set, 256, model.media_tokens)
    data = datasets.Dataset.from_list([{{k: [x.tolist() for x in v] if k in ("images", "audio") else v
                                        for k, v in row.items()}} for row in rows])
    args = TrainingArguments(output_dir=out + "/run", report_to="none", max_steps=2, per_device_train_batch_size=2,
                             logging_steps=1, save_steps=2, learning_rate=1e-2, disable_tqdm=True, deepspeed=ds_json)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=MultimodalCollator(tok.pad_token_id))
    trainer.train()
    with torch.no_grad():  # partitioned again between steps: the table's rows and the writer's weights gathered
        during = model.encoders.image(probe)
    if trainer.is_world_process_zero():
        save_file({{"probe": probe, "before": before, "during": during}}, out + "/probe.safetensors")
""")


@pytest.mark.slow
def test_soft_words_train_under_zero3_with_the_lm_table_and_attention_weights_gathered(tmp_path):
    """ZeRO-3 partitions every parameter and gathers a module's own when it runs. A words projector reads the LM's
    embedding table outside the table's forward, and its writer's attention reads out_proj without calling it:
    both came out as empty partitions (an IndexError, then a shape error). The soft-words recipe now trains under
    ZeRO-3, writes what it wrote before it, and its checkpoint reloads with the same projector outputs."""
    from safetensors.torch import load_file as load

    lora = {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    encoders = {"projector": "words", "image_width": 8, "audio_width": 8}  # the default writer: autoregressive
    _launch(WORDS_SCRIPT.format(config=lora, encoders=encoders), tmp_path, zero=3)
    probe = load(str(tmp_path / "probe.safetensors"))
    torch.testing.assert_close(probe["during"], probe["before"])
    reloaded = moelora.MoELoRAModel.from_pretrained(tied_llama(), tmp_path / "run" / "checkpoint-2").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encoders.image(probe["probe"]), probe["before"])
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in reloaded.adapter_state_dict().items())
