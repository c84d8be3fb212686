"""Quick perception experiments (issue 18): LoRA + encoders on a few multimodal tasks, exact match at the end.

    python scripts/perception_exp.py --tasks digit_read --steps 80 --align 80 --eval-every 40 --out run.json

A plain loop (AdamW, warm-up + cosine, clipping at 1), not train.py: it logs the gradient norms reaching the
encoders and the adapters every 10 steps, and `--align N` runs the first N steps with the adapters off in the
forward pass (train.py's `stage: align`). The numbers it gave are in benchmarks/RESULTS.md §8.
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelora.base_models import resolve_base_model  # noqa: E402
from moelora.data.media import MultimodalCollator, encode_multimodal_examples  # noqa: E402
from moelora.data.multimodal import build_multimodal_suite  # noqa: E402
from moelora.evaluation import evaluate_exact_match  # noqa: E402
from moelora.methods.lora import LoRAConfig  # noqa: E402
from moelora.model import get_moelora_model  # noqa: E402
from moelora.multimodal.encoders import EncoderConfig  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=["digit_read", "shape_color", "spoken_digit"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--align", type=int, default=0, help="first N steps: adapters off, encoders only")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--enc-lr", type=float, default=None)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--grid", type=int, default=2)
    p.add_argument("--proj-scale", type=float, default=1.0, help="multiply projector last-layer init")
    p.add_argument("--no-feature-norm", action="store_true", help="encoders without feature_norm")
    p.add_argument("--no-pos", action="store_true", help="encoders without position_embedding")
    p.add_argument("--token-norm", action="store_true", help="encoders with token_norm")
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    base, tok = resolve_base_model("smollm2-135m-instruct")
    model = get_moelora_model(base, LoRAConfig(r=a.r, alpha=2 * a.r, target_modules=a.targets),
                              encoders=EncoderConfig(image_grid=a.grid, feature_norm=not a.no_feature_norm,
                                                           position_embedding=not a.no_pos,
                                                     token_norm=a.token_norm))
    if a.proj_scale != 1.0:
        with torch.no_grad():
            for enc in (model.encoders.image, model.encoders.audio):
                enc.proj[2].weight.mul_(a.proj_scale)
    train, evals = build_multimodal_suite(a.tasks, n_train_per_task=a.n_train, n_eval_per_task=32, seed=a.seed)
    enc_rows = encode_multimodal_examples(tok, train, 128, model.media_tokens)
    coll = MultimodalCollator(tok.pad_token_id)
    enc_params = [p for n, p in model.named_parameters() if p.requires_grad and "encoders." in n]
    ada_params = [p for n, p in model.named_parameters() if p.requires_grad and "encoders." not in n]
    opt = torch.optim.AdamW([{"params": enc_params, "lr": a.enc_lr or a.lr}, {"params": ada_params, "lr": a.lr}],
                            weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    rng = random.Random(a.seed)
    order = list(range(len(enc_rows)))
    log = []
    t0 = time.time()
    pos = len(order)
    for step in range(a.steps):
        frac = step / a.steps
        warm = min(1.0, (step + 1) / max(1, int(0.05 * a.steps)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * frac))
        if pos + a.bs > len(order):
            rng.shuffle(order)
            pos = 0
        rows = [enc_rows[i] for i in order[pos:pos + a.bs]]
        pos += a.bs
        batch = coll(rows)
        tasks = batch.pop("tasks")
        align = step < a.align
        model.train()
        for lay in model.adapter_layers().values():
            lay.adapter_enabled = not align  # align stage: the LM runs without adapters
        out = model(**batch)
        loss = out.loss.detach()
        out.loss.backward()
        gn = {k: math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps if p.grad is not None))
              for k, ps in (("enc", enc_params), ("ada", ada_params))}
        torch.nn.utils.clip_grad_norm_(enc_params + ada_params, 1.0)
        if align:
            for p in ada_params:
                p.grad = None
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == a.steps - 1:
            rec = {"step": step, "loss": float(loss), "align": align, "gn_enc": gn["enc"], "gn_ada": gn["ada"],
                   "t": round(time.time() - t0)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if a.eval_every and (step + 1) % a.eval_every == 0:
            model.eval()
            r = evaluate_exact_match(model, tok, evals, batch_size=64, max_new_tokens=6, progress=False)
            print("EVAL", step + 1, json.dumps(r["per_task"]), flush=True)
    model.eval()
    r = evaluate_exact_match(model, tok, evals, batch_size=64, max_new_tokens=6, progress=False)
    print("FINAL", json.dumps(r["per_task"]), "avg", r["average"], "time", round(time.time() - t0), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "log": log, "final": r["per_task"],
                                           "predictions": r["predictions"]}, indent=1))


if __name__ == "__main__":
    main()
