#!/usr/bin/env python
"""Train one moelora method on a base model and evaluate every task before and after.

    accelerate launch train.py --config configs/smora.yaml                  # the default run
    python train.py --config configs/lora.yaml max_steps=50 method.r=16      # dotted key=value overrides
    python train.py --config configs/smora.yaml resume_from_checkpoint=true  # continue the newest checkpoint

The story of a run, top to bottom: config -> accelerator -> base model -> adapter -> data ->
optimizer -> resume -> evaluate the base -> train -> save the adapter -> evaluate the trained model.
Every bad input is reported as one line naming the key, file or shape, with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict:
    """Train (see `train`); the output folder's lock is released however the run ends, and Ctrl-C
    becomes one line saying what was saved (exit code 130 from `cli`)."""
    from moelora.errors import Interrupted

    run = RunRecord()
    try:
        return train(argv, run)
    except KeyboardInterrupt:
        raise Interrupted(run.saved_note()) from None
    except Exception:
        if run.adapter_saved:  # e.g. a crash in the final evaluation: training itself is not lost
            print(f"note: the trained adapter was saved to {run.output_dir / 'adapter'} before this error",
                  file=sys.stderr)
        raise
    finally:
        run.release()


def train(argv: list[str] | None, run: RunRecord) -> dict:
    # --- 1. config: YAML + overrides, validated before anything slow starts ---------------------
    args = parse_args(argv)
    from moelora.training.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)

    import torch
    from accelerate import Accelerator, DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.utils import DDPCommunicationHookType, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    import moelora
    from moelora.base_models import resolve_base_model
    from moelora.data.formatting import Collator, encode_examples
    from moelora.data.media import MultimodalCollator, encode_multimodal_examples
    from moelora.evaluation import evaluate_exact_match, evaluate_loss, format_results_table
    from moelora.model import check_token_ids
    from moelora.multimodal.transfer import load_encoders_from, matching_adapter_folder
    from moelora.multimodal.pretraining import pretrain_encoders
    from moelora.multimodal.model import attach_seeded_encoders
    from moelora.training.examples import load_examples, load_pretraining_examples
    from moelora.checkpoint import write_json
    from moelora.supervised_loss import supervised_positions
    from moelora.training.batches import BatchOrder
    from moelora.errors import ConfigError, TrainingError, short_repr
    from moelora.training.output_dir import check_output_dir, claim_output_dir, continue_data_selection
    from moelora.training.parts import configure_parts, logged_rates, parameter_groups
    from moelora.training.metrics import MetricsLogger, name_layers, router_health, summarise_router_stats
    from moelora.training.step_health import non_finite_error, read_step, weights_finite
    from moelora.training.state import (load_checkpoint, prune_checkpoints, read_trainer_state, resolve_resume,
                                        save_checkpoint)

    # --- 2. accelerator: devices, processes, mixed precision, DeepSpeed ----------------------------
    # CPU-only process groups need gloo (accelerate picks none there); a single process needs no group.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if needs_gloo(cfg) else []
    ddp = {}
    if cfg.data.suite == "multimodal":  # modality routing's LoRAs get no gradient from an all-text batch
        ddp["find_unused_parameters"] = True
    if cfg.ddp_comm_hook != "none":  # 16-bit gradients in the all-reduce (DDP; refused with DeepSpeed)
        ddp["comm_hook"] = DDPCommunicationHookType(cfg.ddp_comm_hook)
    if ddp:
        handlers.append(DistributedDataParallelKwargs(**ddp))
    accelerator = Accelerator(
        # On a machine without GPUs, `accelerate launch --multi_gpu` must still mean data parallel over CPU
        # processes (gloo); DeepSpeed brings its own CPU accelerator and must not be forced off by cpu=True.
        cpu=not torch.cuda.is_available() and cfg.deepspeed is None,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg.deepspeed) if cfg.deepspeed else None,
        kwargs_handlers=handlers,
    )
    is_main = accelerator.is_main_process
    # `accelerate launch` sets OMP_NUM_THREADS=1 even for a single process, which halves CPU training
    # speed on 2 cores: use the cores this process has a share of, unless num_threads says otherwise.
    torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes))

    # --- 3. data: the built-in task suite and/or user files (read before anything slow or written) --
    output_dir = run.output_dir = Path(cfg.output_dir)
    resume = resolve_resume(cfg.resume_from_checkpoint, output_dir)
    if note := continue_data_selection(cfg, resume):  # data.tasks=auto resumes on the checkpoint's own tasks
        accelerator.print(note)
    train_examples, eval_examples = load_examples(cfg)
    pretraining_examples = load_pretraining_examples(cfg) if resume is None else []  # encoder pretraining's extra media
    if cfg.init_encoders_from:  # its folder and encoder config are checked now, before the model loads
        matching_adapter_folder(cfg.init_encoders_from, cfg.encoders)
    # Task-routed methods (LoRA-Mixer's stage 1) need an expert per task: every task is checked now, not
    # when its first row comes up mid-run.
    cfg.method_config.task_labels(sorted({ex["task"] for ex in train_examples + eval_examples}))
    resumed_step = read_trainer_state(resume)["counters"]["step"] if resume is not None else None
    # Another run's folder, a foreign or mismatched checkpoint: refused now, before the model loads
    # (claim_output_dir checks again under the lock).
    share_outcome(accelerator, lambda: check_output_dir(output_dir, cfg, resume) if is_main else None)
    set_seed(cfg.seed)

    # --- 4. base model and adapter --------------------------------------------------------------
    base, tokenizer = resolve_base_model(cfg.base_model, dtype=getattr(torch, cfg.dtype))
    multimodal = cfg.data.suite == "multimodal"  # images/audio: encoders + projectors train with the adapter
    try:
        model = moelora.get_moelora_model(base, cfg.method_config, base_model_id=cfg.base_model)
        if multimodal:  # on an RNG stream of their own: every method's run of one seed starts the same encoders
            attach_seeded_encoders(model, cfg.encoders, cfg.seed)
    except (MemoryError, RuntimeError) as exc:  # e.g. method.r=1e10: report the size, not an allocator trace
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc) and "out of memory" not in str(exc):
            raise
        raise ConfigError("method", f"the adapter does not fit in memory (method.r or the number of experts too "
                          f"large?): {short_repr(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}") from None
    # ZeRO-3 gathers an encoder's shards on every process at once: each must run it every step
    model.run_every_encoder = multimodal and accelerator.num_processes > 1
    if cfg.init_encoders_from:  # e.g. the align stage's run: its encoders + projectors (safetensors) start this run
        n_copied = load_encoders_from(model, cfg.init_encoders_from)
        accelerator.print(f"encoders and projectors initialised from {cfg.init_encoders_from} ({n_copied} tensors)")
    configure_parts(model, cfg)  # stage (align: adapters off in the forward) and freeze_* switches
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    base.config.use_cache = False  # no KV cache while training; generation turns it back on
    if cfg.compile:  # in place: `model` stays the module accelerate wraps and evaluation calls (not compiled: generate)
        model.compile(mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    if is_main:
        model.print_trainable_parameters()

    if multimodal:  # each image/clip becomes a run of placeholder tokens; the collator batches the features
        train_set = encode_multimodal_examples(tokenizer, train_examples, cfg.data.max_length, model.media_tokens)
        collate = MultimodalCollator(tokenizer.pad_token_id, cfg.data.pad_to_multiple_of or None)
    else:
        train_set = encode_examples(tokenizer, train_examples, cfg.data.max_length)
        collate = Collator(tokenizer.pad_token_id, cfg.data.pad_to_multiple_of or None)  # static shapes: data.pad_to_multiple_of
    evaluating = bool(eval_examples) and (cfg.eval_before_training or cfg.eval_strategy != "no")
    check_positions(cfg, base.config, tokenizer, eval_examples if evaluating else [],
                    getattr(model, "media_tokens", None))
    order = BatchOrder(len(train_set), cfg.per_device_train_batch_size, accelerator.num_processes,
                       accelerator.process_index, cfg.seed,
                       lengths=[len(row["input_ids"]) for row in train_set] if cfg.data.group_by_length else None)
    g = cfg.gradient_accumulation_steps
    max_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * order.batches_per_epoch / g)

    # --- 5. optimizer and schedule (the scheduler is stepped by hand: once per optimizer step) ---
    # One parameter group per part (adapters, encoders, projectors) with its own learning rate; the scheduler
    # scales every group alike.
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.learning_rate, cfg.encoder_learning_rate,
                                                   cfg.projector_learning_rate),
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=int(cfg.warmup_ratio * max_steps),
                              num_training_steps=max_steps)

    # --- 6. resume (before `prepare` shards anything): adapter, optimizer, scheduler, RNG, counters --
    counters = {"step": 0, "micro_step": 0, "skipped_steps": 0}
    if resume is not None:
        counters = load_checkpoint(resume, model, optimizer, scheduler)
    # Everything is checked (config, data, model, checkpoint): now, and only now, the output folder is
    # locked, cleared or cut back to the resumed step, and written.
    run.lock = share_outcome(accelerator, lambda: claim_output_dir(output_dir, cfg, resume, resumed_step)
                             if is_main else None)
    if resume is not None:
        accelerator.print(f"resumed from {resume} at step {counters['step']}")
    # Our conv encoders first learn what the pictures and clips show, from their labels, with no LM (a stand-in
    # for a pretrained CLIP/Whisper); a resumed run's checkpoint holds them already.
    if cfg.encoder_pretraining_steps and resume is None:
        report = pretrain_encoders(model.encoders, train_examples + pretraining_examples, eval_examples,
                                   cfg.encoder_pretraining_steps, cfg.seed, tokenizer)
        scores = "; ".join(f"{kind} {entry.get('held-out accuracy')}" for kind, entry in report.items())
        accelerator.print(f"encoders pretrained on labels ({cfg.encoder_pretraining_steps} steps); held-out "
                          f"accuracy (%): {scores}")
        if is_main:
            write_json(output_dir / "encoder_pretraining.json", report)

    deepspeed = accelerator.state.deepspeed_plugin is not None
    if deepspeed:
        fill_deepspeed_autos(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, accelerator.num_processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)  # the MoELoRAModel itself (DDP/DeepSpeed wrap it)
    core.router_state_to_fp32()  # DeepSpeed's bf16/fp16 engine casts every buffer: SMoRA's beta must stay fp32
    # ZeRO-3 gathers every weight collectively in each forward, so evaluation (greedy generation, the same
    # steps everywhere) runs on all processes in lockstep; otherwise the main process evaluates alone.
    evaluates = is_main or (deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3)

    # --- 7. evaluate the base model (adapters off) for the before/after table ---------------------
    def run_eval(m, base_only: bool) -> dict:
        m.eval()
        with m.disable_adapter() if base_only else contextlib.nullcontext():
            res = evaluate_exact_match(m, tokenizer, eval_examples, cfg.per_device_eval_batch_size,
                                       cfg.eval_max_new_tokens, progress=is_main)
            if not multimodal:  # training's loss (response tokens) on the held-out examples, and its perplexity
                held_out = evaluate_loss(m, tokenizer, eval_examples, cfg.per_device_eval_batch_size, cfg.data.max_length)
                res.update(loss=held_out["loss"], perplexity=held_out["perplexity"])
        m.train()
        return res

    results = {}
    if cfg.eval_before_training and eval_examples:
        base_settings = json.loads(json.dumps({"base_model": cfg.base_model, "data": cfg.data.to_dict(),
                                               "seed": cfg.seed, "eval_max_new_tokens": cfg.eval_max_new_tokens}))
        results["base"] = cached_eval(output_dir / "eval_base.json", evaluates, is_main, accelerator,
                                      lambda: run_eval(core, True), base_settings)

    # --- 8. train ---------------------------------------------------------------------------------
    logger = MetricsLogger(output_dir, cfg.report_to, is_main, append=resume is not None)
    manifest = {"training_config": cfg.to_dict()}
    model.train()
    core.reset_router_stats()
    bar = run.progress = tqdm(total=max_steps, initial=counters["step"], desc="train", unit="step", disable=not is_main)
    def fresh_window():  # what the metrics of one logging interval are summed from
        return {"loss": 0.0, "aux": 0.0, "n": 0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}

    window = fresh_window()
    last_loss = None
    world = accelerator.num_processes
    vocab = core.base_model.get_input_embeddings().num_embeddings
    core.token_ids_checked_by_caller = True  # each host batch is checked below, before it moves to the device
    # fp16 autocast on a GPU: accelerate's GradScaler skips overflowing steps and lowers the scale itself, which
    # is loss scaling working, not divergence (an fp16 run overflows in its first steps by design)
    scaler = getattr(accelerator, "scaler", None)
    params = core.trainable_parameters()
    weights_ok = torch.ones((), dtype=torch.bool, device=accelerator.device)  # after the latest update
    skips_in_a_row = 0
    last_step_loss = None  # the LM loss of the latest applied step (this process's share)
    while counters["step"] < max_steps:
        loss_before = window["loss"]
        micro_batches = []
        supervised = 0  # response tokens of the step's micro-batches (this process)
        for _ in range(g):
            batch = collate([train_set[i] for i in order.indices(counters["micro_step"] + len(micro_batches))])
            labels = core.method_config.task_labels(batch.pop("tasks"))  # for methods routed by task label
            if labels is not None:
                batch["sample_labels"] = torch.tensor(labels)
            check_token_ids(batch["input_ids"], vocab)  # on the host batch: no device sync, nothing in a compiled graph
            if cfg.logits_on_supervised_only:  # the LM head runs only where the loss reads (same loss)
                batch["supervised_positions"] = supervised_positions(batch["labels"])
            # Counted on the host batch: the same count of the device copy would make the host wait for the GPU.
            supervised += int((batch["labels"][:, 1:] != -100).sum())
            window["tokens"] += int(batch["attention_mask"].sum())
            micro_batches.append({k: v.to(accelerator.device) for k, v in batch.items()})
        # The loss is a mean over every response token of the optimizer step, on all processes: then
        # 2 processes x batch b, 1 process x batch 2b and accumulation all give the same gradient.
        step_tokens = accelerator.reduce(torch.tensor(supervised, device=accelerator.device), "sum").clamp(min=1)
        # The forward's losses stay on the device until the step's one host read below (reading them per
        # micro-batch would stop the host once per micro-batch on a GPU). loss_ok: the forward's losses are
        # finite (an overflow only in the gradients is loss scaling's business).
        loss_ok = torch.ones((), dtype=torch.bool, device=accelerator.device)
        lms, auxes = [], []
        for batch in micro_batches:
            with accelerator.accumulate(model):
                out = model(**batch, num_items_in_batch=step_tokens)
                aux = out["aux_loss"] if "aux_loss" in out else 0.0  # router losses (e.g. LoRA-Mixer's SBL)
                lm = out.loss - aux  # this micro-batch's share of the step's token-mean LM loss
                loss_ok = loss_ok & torch.isfinite(out.loss.detach())
                # accelerate divides by g and DDP/DeepSpeed average over processes: undo both for the sum.
                accelerator.backward(lm * (world * g) + aux)
            counters["micro_step"] += 1
            lms.append(lm.detach().float())
            if torch.is_tensor(aux):
                auxes.append(aux.detach().float())
            else:
                window["aux"] += float(aux)
            window["n"] += 1
        window["steps"] += 1
        # The gradient norm (clipped or not) also tells whether any gradient is non-finite; it is read
        # together with the previous update's weight check and this step's losses: one host read per step.
        norm = accelerator.clip_grad_norm_(core.trainable_parameters(), cfg.max_grad_norm or float("inf"))
        read = read_step(accelerator, norm, loss_ok, weights_ok, lms, auxes)
        finite, step_norm = read.finite, read.grad_norm
        for v in read.lm_losses:  # summed in micro-batch order, as each was read before
            window["loss"] += v
        for v in read.aux_losses:
            window["aux"] += v
        if not read.weights_were_ok:  # skipping cannot help: the weights themselves are lost
            bar.close()
            raise non_finite_error(cfg, counters["step"], output_dir, weights=True)
        if not finite and scaler is not None and read.loss_finite:  # overflow under loss scaling: the scaler's step
            optimizer.step()  # skips the update and lowers the scale
            counters["skipped_steps"] += 1
        elif finite:
            optimizer.step()
            scheduler.step()
            weights_ok = weights_finite(params)  # read with the next step's flags (or before a save)
            skips_in_a_row = 0
            last_step_loss = window["loss"] - loss_before
        elif cfg.nan_policy == "stop":
            bar.close()
            raise non_finite_error(cfg, counters["step"] + 1, output_dir)
        else:
            counters["skipped_steps"] += 1
            skips_in_a_row += 1
            if skips_in_a_row >= cfg.nan_max_consecutive_skips:
                bar.close()
                raise non_finite_error(cfg, counters["step"] + 1, output_dir, skipped=skips_in_a_row)
        optimizer.zero_grad(set_to_none=True)
        core.update_router_state(apply=finite)  # loss-free balancing etc.: once per optimizer step, all-reduced
        counters["step"] += 1
        bar.update(1)

        step = counters["step"]
        if step % cfg.logging_steps == 0 or step == max_steps:
            elapsed = time.perf_counter() - window["t0"]
            loss_sum = accelerator.reduce(torch.tensor(window["loss"], device=accelerator.device), "sum")
            loss_mean = float(loss_sum) / window["steps"]  # exact token-mean LM loss per step, all processes
            stats = core.router_stats()
            record = {"loss": loss_mean, **logged_rates(optimizer.param_groups), "epoch": order.epoch_of(counters["micro_step"]),
                      "tokens_per_s": window["tokens"] * accelerator.num_processes / elapsed,
                      "skipped_steps": counters["skipped_steps"], **summarise_router_stats(stats)}
            if step_norm is not None:  # the latest step's total gradient norm before clipping (as Trainer logs it)
                record["grad_norm"] = step_norm
            health = router_health(stats, cfg.router_collapse_entropy)
            if health["collapsed"]:
                record["router/collapsed_layers"] = health["collapsed"]
                message = (f"router collapse at step {step}: load entropy < {cfg.router_collapse_entropy} in "
                           f"{len(health['collapsed'])} layers ({name_layers(health['collapsed'])})")
                if cfg.router_collapse_stop:
                    logger.log(step, record)
                    bar.close()
                    raise TrainingError(message + "; stopped (router_collapse_stop=true), checkpoints intact")
                if is_main:
                    tqdm.write("warning: " + message, file=sys.stderr)
            if health["dead"]:
                record["router/dead_layers"] = health["dead"]  # "layer:count" of experts that got no token
            if window["aux"]:
                record["aux_loss"] = window["aux"] / window["n"]
            last_loss = loss_mean
            logger.log(step, record)
            bar.set_postfix(loss=f"{loss_mean:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            core.reset_router_stats()
            window = fresh_window()
        if cfg.eval_strategy == "steps" and step % cfg.eval_steps == 0 and step < max_steps and eval_examples:
            if evaluates:
                scores = run_eval(core, False)
                if is_main:
                    logger.log(step, eval_record(scores))
            accelerator.wait_for_everyone()
        if cfg.save_steps and step % cfg.save_steps == 0 and step < max_steps:
            if not bool(weights_ok):  # never write a non-finite checkpoint (it would be the "last good" one)
                raise non_finite_error(cfg, step, output_dir, weights=True)
            with core.gathered_adapter():  # ZeRO-3: every process takes part; the main one writes
                if is_main:  # DeepSpeed shards optimizer moments: its checkpoints restart them on resume
                    save_checkpoint(output_dir / f"checkpoint-{step}", core, None if deepspeed else optimizer,
                                    scheduler, counters, manifest)
                    prune_checkpoints(output_dir, cfg.save_total_limit)
            accelerator.wait_for_everyone()
    bar.close()

    # --- 9. save the adapter, evaluate the trained model, write the tables ------------------------
    check_router_state_in_sync(accelerator, core)
    if not bool(weights_ok):
        raise non_finite_error(cfg, counters["step"], output_dir, weights=True)
    # The last applied step's loss: the same however often the run was resumed (a logging window is not).
    if last_step_loss is not None:
        last_step_loss = float(accelerator.reduce(torch.tensor(last_step_loss, device=accelerator.device), "sum"))
    summary = {"final_loss": last_step_loss if last_step_loss is not None else last_loss, "steps": counters["step"]}
    # The adapter is saved before the final evaluation: a crash or Ctrl-C there must not lose the training.
    with core.gathered_adapter():
        final_state = {k: v.detach().clone() for k, v in core.adapter_state_dict().items()} if is_main else None
    if is_main:
        manifest["metrics"] = {**summary, **{f"{name}_exact_match": r["per_task"] | {"average": r["average"]}
                                            for name, r in results.items()}}
        core.save_pretrained(output_dir / "adapter", manifest=manifest, dtype=getattr(torch, cfg.save_dtype),
                             state=final_state, format=cfg.save_format)
        run.adapter_saved = True
    accelerator.wait_for_everyone()
    if eval_examples and cfg.eval_strategy != "no":  # "no": no evaluation at all (evaluate.py can score it later)
        results["trained"] = run_eval(core, False) if evaluates else {}
    if is_main:
        manifest["metrics"] = {**summary, **{f"{name}_exact_match": r["per_task"] | {"average": r["average"]}
                                            for name, r in results.items()},
                               **{f"{name}_eval_{k}": r[k] for name, r in results.items()
                                  for k in ("loss", "perplexity") if k in r}}
        update_manifest(output_dir / "adapter", manifest["metrics"])
        if results:
            table = format_results_table(results)
            print("\nper-task exact match (held-out split):\n" + table)
            (output_dir / "eval_results.md").write_text(table + "\n")
            (output_dir / "eval_results.json").write_text(json.dumps(
                {name: {k: r[k] for k in EVAL_KEYS if k in r} for name, r in results.items()}, indent=2))
        print(f"adapter saved to {output_dir / 'adapter'}")
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # DeepSpeed's engine lets go of its gloo work while Python is alive (else: SIGABRT at exit)
    accelerator.end_training()
    return {**summary, "results": {k: v.get("average") for k, v in results.items()},
            "eval_loss": {k: v["loss"] for k, v in results.items() if "loss" in v}}


# --- helpers: each one step of the story above ---------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.k=4 max_steps=20")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after --config


def needs_gloo(cfg) -> bool:
    import torch

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.deepspeed is not None
    return distributed and not torch.cuda.is_available()


def fill_deepspeed_autos(ds: dict, cfg, world: int) -> None:
    """Resolve the "auto" batch fields of a DeepSpeed JSON from the run config (accelerate would take
    them from a prepared DataLoader, which train.py does not use: its batch order is its own)."""
    values = {"train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
              "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
              "gradient_clipping": cfg.max_grad_norm}
    for key, value in values.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world


def check_router_state_in_sync(accelerator, core) -> None:
    """Router buffers (SMoRA's bias) are updated from all-reduced counts, so every process must hold
    the same values; a difference would mean the processes trained different models."""
    import torch

    from moelora.errors import TrainingError

    buffers = [b.detach().double().sum() for b in core.adapter_buffers().values()]
    if accelerator.num_processes == 1 or not buffers:
        return
    local = torch.stack(buffers).to(accelerator.device)
    everyone = accelerator.gather(local[None])
    if not torch.equal(everyone.min(0).values, everyone.max(0).values):
        raise TrainingError("router state (e.g. SMoRA's bias) differs between processes; please report this bug")


class RunRecord:
    """What one run holds and has saved: its output folder, the folder's lock, whether the adapter is written."""

    def __init__(self):
        self.output_dir: Path | None = None
        self.lock = None  # moelora.training.output_dir.RunLock, on the main process once the folder is claimed
        self.adapter_saved = False
        self.progress = None  # the training progress bar: closed before any final message is printed

    def saved_note(self) -> str:
        from moelora.training.state import list_checkpoints

        if self.lock is None:
            return "stopped before training started; nothing was written"
        if self.adapter_saved:
            return f"the trained adapter is saved in {self.output_dir / 'adapter'} (the final evaluation did not finish)"
        last = list_checkpoints(self.output_dir)
        if last:
            return f"stopped; the newest checkpoint is {last[-1]} (continue with resume_from_checkpoint=true)"
        return "stopped before the first checkpoint; nothing of the training was saved (save_steps keeps progress)"

    def release(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.lock is not None:
            self.lock.release()


def share_outcome(accelerator, claim):
    """Run `claim()` (the main process's output-folder checks) and let every process share its outcome: a
    refused folder stops all of them (the others silently, with the same exit code), none waits forever."""
    from moelora.errors import MoeloraError

    problem, result = None, None
    try:
        result = claim()
    except MoeloraError as exc:
        problem = exc
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([problem is not None])[0]
        if refused and problem is None:
            raise SystemExit(2)  # the main process prints the one line
    if problem is not None:
        raise problem
    return result


def check_positions(cfg, base_config, tokenizer, eval_examples, media_tokens) -> None:
    """Sequences must fit the base model's positions: beyond them a CPU run fails with an IndexError and a
    GPU one with a device-side assert, after the base model is loaded (training) or after training (generation)."""
    from moelora.data.media import encode_prompts
    from moelora.errors import ConfigError

    limit = getattr(base_config, "max_position_embeddings", None) or getattr(base_config, "n_positions", None)
    if not isinstance(limit, int):
        return
    if cfg.data.max_length > limit:
        raise ConfigError("data.max_length", f"{cfg.data.max_length} exceeds the {limit} positions of base model "
                          f"{cfg.base_model}; set data.max_length <= {limit}")
    if eval_examples:
        prompt_ids, _ = encode_prompts(tokenizer, eval_examples, media_tokens)
        longest = max(len(p) for p in prompt_ids)
        if longest + cfg.eval_max_new_tokens > limit:
            raise ConfigError("eval_max_new_tokens", f"{cfg.eval_max_new_tokens} new tokens after the longest "
                              f"evaluation prompt ({longest} tokens) exceed the {limit} positions of base model "
                              f"{cfg.base_model}; set eval_max_new_tokens <= {limit - longest}")


def update_manifest(adapter_dir: Path, metrics: dict) -> None:
    """Add the final evaluation's scores to a saved adapter's manifest.json (atomically)."""
    from moelora.checkpoint import read_json, write_json
    from moelora.model import MANIFEST_NAME

    manifest = read_json(adapter_dir / MANIFEST_NAME, "manifest")
    write_json(adapter_dir / MANIFEST_NAME, {**manifest, "metrics": metrics})


EVAL_KEYS = ("per_task", "average", "n", "loss", "perplexity")  # what eval_results.json keeps of a result


def eval_record(res: dict) -> dict:
    """A log record of one evaluation: eval/<task> exact match, eval/average, eval/loss, eval/perplexity."""
    record = {f"eval/{k}": v for k, v in res["per_task"].items()} | {"eval/average": res["average"]}
    record |= {f"eval/{k}": res[k] for k in ("loss", "perplexity") if k in res}
    return record


def cached_eval(path: Path, evaluates: bool, is_main: bool, accelerator, run, settings: dict) -> dict:
    """The base model's scores do not change on resume: compute once, reuse from the output folder, as long
    as they were computed with the same `settings` (base model, tasks, generation length)."""
    result = {}
    if evaluates:
        cached = None
        if path.is_file():
            try:
                cached = json.loads(path.read_text())
            except json.JSONDecodeError:  # a torn write: compute again
                cached = None
        if isinstance(cached, dict) and cached.get("settings") == settings:
            result = cached
        else:
            result = run()
            if is_main:
                path.write_text(json.dumps({**{k: result[k] for k in EVAL_KEYS if k in result},
                                            "settings": settings}, indent=2))
    accelerator.wait_for_everyone()
    return result


def cli(argv: list[str] | None = None) -> int:
    from moelora.errors import run_cli  # bad input: exit 2; Ctrl-C: exit 130, one line each

    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
