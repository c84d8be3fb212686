"""moelora under a plain `transformers.Trainer` and TRL's `SFTTrainer`, with the user's script unchanged.

Tiny tied-embedding Llama (tie_word_embeddings=True, as SmolLM2 and Gemma), default Trainer arguments apart from
the run length, logging and checkpoint cadence.
"""

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import moelora
from moelora.checkpoint import PICKLE_SUFFIXES
from tests.method_cases import METHOD_CASES, TEXT_METHODS

datasets = pytest.importorskip("datasets")
# Trainer's own resume state (not the model): PEFT checkpoints hold the same files
TRAINER_STATE_FILES = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}


def tied_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def rows(n=8, length=12, seed=1):
    """Equal-length rows (no padding: micro-batch means and token means agree) with a text column Trainer drops."""
    ids = torch.randint(3, 259, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids,
                                       "text": ["not a model input"] * n})


def trainer(model, out, data=None, data_collator=None, **kw):
    args = dict(output_dir=str(out), use_cpu=True, report_to="none", max_steps=2, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, logging_steps=1, save_steps=1, eval_strategy="steps", eval_steps=2,
                learning_rate=1e-2, disable_tqdm=True)
    args.update(kw)
    data = rows() if data is None else data
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=data, eval_dataset=data.select(range(2)),
                   data_collator=data_collator)


def _model(method, **extra):
    torch.manual_seed(0)
    return moelora.get_moelora_model(tied_llama(), {"name": method, **METHOD_CASES[method], **extra})


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _count_router_updates(model) -> list:
    """Calls of a stateful layer's apply_step (one per optimizer step expected); [] for stateless methods."""
    calls = []
    for layer in model.adapter_layers().values():
        if layer.step_counts() is not None:
            apply = layer.apply_step
            layer.apply_step = lambda counts, apply=apply: (calls.append(1), apply(counts))[1]
            break
    return calls


@pytest.mark.parametrize("method", TEXT_METHODS)
def test_trainer_trains_logs_checkpoints_and_resumes(method, tmp_path):
    model = _model(method)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    updates = _count_router_updates(model)
    run = trainer(model, tmp_path / "run")
    run.train()

    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed
    history = run.state.log_history
    assert any("eval_loss" in h for h in history)  # label_names is ['labels'], not ['sample_labels']
    if model.router_stats():
        assert any("router/load_entropy" in h for h in history)  # router metrics reach Trainer's logs
    if any(layer.step_counts() is not None for layer in model.adapter_layers().values()):
        assert len(updates) == 2  # once per optimizer step (2 steps x 2 micro-batches), nothing added by the user
    if method == "smora":
        bias = next(iter(model.adapter_layers().values())).bias
        assert bias.abs().max() > 0  # loss-free balancing ran: beta moved

    # checkpoint-2 is a moelora adapter folder: safetensors + JSON, no model pickle, no base (tied) tensors
    ckpt = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"moelora_config.json", "adapter_model.safetensors", "manifest.json"} <= files
    assert {f for f in files if f.endswith(PICKLE_SUFFIXES)} <= TRAINER_STATE_FILES
    assert not any("embed_tokens" in k or "lm_head" in k for k in load_file(str(ckpt / "model.safetensors")))
    ids = torch.tensor(rows(2, seed=5)["input_ids"])
    want = _logits(model, ids)
    reloaded = moelora.MoELoRAModel.from_pretrained(tied_llama(), ckpt)
    torch.testing.assert_close(_logits(reloaded, ids), want)

    if method == "lora":  # trainer.save_model() writes model.safetensors only: the error says what to do
        run.save_model(str(tmp_path / "final"))
        with pytest.raises(moelora.CheckpointError, match=r"Trainer.save_model\(\) folder.*model.save_pretrained"):
            moelora.MoELoRAModel.from_pretrained(tied_llama(), tmp_path / "final")

    # Trainer's own resume from checkpoint-1 reaches the same adapter as the uninterrupted run
    resumed = _model(method)
    again = trainer(resumed, tmp_path / "run")
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert again.state.global_step == 2
    torch.testing.assert_close(_logits(resumed, ids), want, atol=1e-5, rtol=1e-4)


def test_router_loss_counts_once_per_optimizer_step(tmp_path):
    """LoRA-Mixer's SBL is a per-micro-batch mean: 4 rows as 4x1 or 1x4 give the same first loss."""
    first = []
    for batch_size, accumulation in ((4, 1), (1, 4)):
        model = _model("lora_mixer")
        run = trainer(model, tmp_path / f"b{batch_size}", max_steps=1, per_device_train_batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, eval_strategy="no", save_strategy="no")
        run.train()
        first.append(run.state.log_history[0]["loss"])
    assert first[0] == pytest.approx(first[1], rel=2e-3)  # 5.7364 vs 5.7377; before: aux counted 4x at 1 x 4


def test_fused_lm_head_outputs_carry_the_router_loss_gradient():
    """TRL's fused_lm_head=True path: same value as TRL computes, same gradient as loss = LM mean + router loss."""
    model = _model("lora_mixer")
    ids = torch.tensor(rows(2)["input_ids"])
    model.train()
    grads = []
    for fused in (False, True):
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, fused_lm_head=fused)
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
        if fused:
            assert out.log_probs.shape == (2, 11) and out.label_mask.all()
            torch.testing.assert_close(out.loss, -out.log_probs.sum() / out.label_mask.sum())
    for plain, fused in zip(*grads):
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-4)


def test_sft_trainer_on_chat_messages(tmp_path):
    trl = pytest.importorskip("trl")
    from moelora.base_models import resolve_base_model

    tokenizer = resolve_base_model("tiny-random-llama")[1]  # ChatML template, 259 tokens as tied_llama
    chats = [{"messages": [{"role": "user", "content": f"add {i} and {i + 1}"},
                           {"role": "assistant", "content": str(2 * i + 1)}]} for i in range(8)]
    data = datasets.Dataset.from_list(chats)
    model = _model("lora_mixer")
    before = [p.detach().clone() for p in model.trainable_parameters()]
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, report_to="none", max_steps=2,
                         per_device_train_batch_size=2, gradient_accumulation_steps=2, logging_steps=1, save_steps=2,
                         learning_rate=1e-2, disable_tqdm=True, max_length=64)
    run = trl.SFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(2)),
                         processing_class=tokenizer)
    run.train()
    assert any(not torch.equal(p, b) for p, b in zip(model.trainable_parameters(), before))
    logged = run.state.log_history[0]
    assert torch.isfinite(torch.tensor(logged["loss"])) and "aux/balance" in logged  # router-loss terms logged
    assert "eval_loss" in run.evaluate()
    reloaded = moelora.MoELoRAModel.from_pretrained(tied_llama(), tmp_path / "sft" / "checkpoint-2")
    trained = model.adapter_state_dict()  # (the trained model's forward now runs under accelerate's autocast)
    assert all(torch.equal(v, trained[k]) for k, v in reloaded.adapter_state_dict().items())
