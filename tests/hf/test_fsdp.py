"""FSDP2 (torch fully_shard, what accelerate's fsdp_version 2 applies) with 2 CPU processes over gloo: a moelora
model trains like one process on the joint batch and saves full adapter tensors (moelora.fsdp).

accelerate itself runs FSDP only on accelerators (on CPU, Accelerator(cpu=True) makes it data parallel), so the
processes are started with torchrun and shard with fully_shard per decoder layer, as configs/accelerate/fsdp2.yaml
asks accelerate to do on GPUs.
"""

import textwrap

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from tests.processes import run, torchrun

CONFIG = {"name": "smora", "r": 8, "k": 2, "bias_update_rate": 0.1}
SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    import moelora
    from moelora.base_models import resolve_base_model
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    base, _ = resolve_base_model("tiny-random-llama")
    model = moelora.get_moelora_model(base, {config!r})
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert type(model.trainable_parameters()[0]).__name__ == "DTensor"
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids = torch.randint(3, 259, (4, 12), generator=torch.Generator().manual_seed(7))[2 * rank:2 * rank + 2]
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()  # the router state follows through the optimizer hook (counts all-reduced)
        opt.zero_grad()
    with model.gathered_adapter():  # every process gathers; the main one writes
        if rank == 0:
            model.save_pretrained(sys.argv[1])
    dist.destroy_process_group()
""")


def _torchrun(script: str, tmp_path):
    """Runs `script` in 2 CPU processes (gloo); its argv[1] is where it saves the adapter."""
    (tmp_path / "run.py").write_text(script)
    run(torchrun(2, tmp_path / "run.py", tmp_path / "adapter"))


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_train_and_save_full_adapter(tmp_path):
    _torchrun(SCRIPT.format(config=CONFIG), tmp_path)

    # one process, the joint batch of 4 rows: the same gradient (equal token counts) and the same load counts
    torch.manual_seed(0)
    model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], CONFIG)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids = torch.randint(3, 259, (4, 12), generator=torch.Generator().manual_seed(7))
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    saved = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "adapter")
    want, got = model.adapter_state_dict(), saved.adapter_state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].shape == want[key].shape  # full tensors, not one process's shard
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)
    assert any(k.endswith(".bias") and got[k].abs().max() > 0 for k in got)  # SMoRA's beta moved, in step


WORDS_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from tests.hf.test_fsdp import two_sgd_steps
    from tests.multimodal_batches import mixed_batch, soft_words_model
    dist.init_process_group("gloo")
    model, tokenizer = soft_words_model()
    batch = mixed_batch(model, tokenizer, labels=True)  # the same batch on both: the mean gradient is its gradient
    for layer in model.base_model.model.layers:
        fully_shard(layer)
    fully_shard(model)  # the token table too: the words projectors read it outside its own forward
    two_sgd_steps(model, batch)
    with model.gathered_adapter():
        if dist.get_rank() == 0:
            model.save_pretrained(sys.argv[1])
    dist.destroy_process_group()
""")


def two_sgd_steps(model, batch):
    """What each side of the comparison trains (SGD: Adam would amplify rounding, see the test below)."""
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    model.train()
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.slow
def test_fsdp2_trains_soft_words_like_one_process(tmp_path):
    """Under FSDP2 the LM's token table is a sharded DTensor that the words projectors read outside the table's
    forward (the case that broke under ZeRO-3). Two processes on one batch train adapters and encoders exactly as
    one process does (SGD: Adam would turn the ~0 gradient of attention's key bias into rounding-sized steps)."""
    from tests.multimodal_batches import mixed_batch, soft_words_model

    _torchrun(WORDS_SCRIPT, tmp_path)
    model, tokenizer = soft_words_model()
    start = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    two_sgd_steps(model, mixed_batch(model, tokenizer, labels=True))
    saved = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "adapter")
    want, got = model.adapter_state_dict(), saved.adapter_state_dict()
    assert want.keys() == got.keys() and any(k.startswith("encoders.image.proj.previous") for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)
    moved = [k for k in want if not torch.equal(want[k], start[k])]  # it trained: encoders, writer and adapters
    for part in ("encoders.image.", "encoders.audio.", "encoders.image.proj.previous", "lora_B"):
        assert any(part in k for k in moved), part
