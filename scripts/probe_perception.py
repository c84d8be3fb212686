"""Why do the multimodal checkpoints not perceive? Four probes, one JSON report (issue 18).

    python scripts/probe_perception.py --checkpoint model_cards/lora-16-multimodal --out benchmarks/results/perception_probe.json

1. Linear probes (logistic regression, train split -> held-out split) on what each stage of the image and
   audio paths hands on: the raw input, the conv features of a freshly initialised encoder, the conv features
   and the projected tokens of the trained checkpoint. If a probe on the projector's output reads the digit,
   the information reaches the LM and the LM side is at fault; if the conv features already lose it, the
   encoder is.
2. Scale: per-token RMS of projected media tokens against the LM's token embeddings.
3. Gradients: norms reaching encoder, projector and adapter parameters in one training batch.
4. Attention: the share of attention the answer's first position pays to media positions, per layer.
6. Drift: per layer, the RMS of the hidden states at media and at text positions and their cosine with the
   layer's input (the embeddings / projected tokens): how much the LM transforms what it is given.
5. The pipeline itself: with each digit's own token embedding written into its image's placeholder slots
   (an "oracle" encoder) the frozen base LM should name the digit; with zeros it cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelora.data.multimodal import build_multimodal_suite  # noqa: E402

LABELS = {  # task -> what a probe on the item should read
    "digit_read": lambda ex: ex["response"],
    "shape_count": lambda ex: ex["response"],
    "spoken_digit": lambda ex: ex["response"],
    "transcribe_word": lambda ex: ex["response"],
}


def probe_accuracy(x_train, y_train, x_eval, y_eval) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(x_train), y_train)
    return float((clf.predict(scaler.transform(x_eval)) == np.asarray(y_eval)).mean())


def items(examples, task):
    rows = [ex for ex in examples if ex["task"] == task]
    key = "audio" if task in ("spoken_digit", "transcribe_word") else "images"
    return torch.stack([ex[key][0] for ex in rows]), [LABELS[task](ex) for ex in rows]


@torch.no_grad()
def stages(encoder, x):
    """(features flattened, projected tokens [n, k, d]) of one of our conv encoders, as its forward runs."""
    feats = encoder.features(x)
    return feats.flatten(1).numpy(), encoder.proj(feats)


def varying_share(tokens: torch.Tensor) -> float:
    """RMS of the part of [n, k, d] tokens that varies between items, over the tokens' RMS."""
    return float(tokens.std(0).pow(2).mean().sqrt() / tokens.pow(2).mean().sqrt())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="model_cards/lora-16-multimodal")
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--out", default="benchmarks/results/perception_probe.json")
    args = p.parse_args(argv)

    import moelora
    from moelora.multimodal.encoders import EncoderConfig, MultimodalEncoders

    torch.manual_seed(0)
    train, evals = build_multimodal_suite(list(LABELS), n_train_per_task=args.n_train, n_eval_per_task=64, seed=0)
    model, tok = moelora.load(args.checkpoint)
    model.eval()
    emb = model.base_model.get_input_embeddings().weight.detach()
    fresh = {"fresh": MultimodalEncoders(model.encoder_config, emb.shape[1], float(emb.std()))}
    if hasattr(EncoderConfig, "feature_norm"):  # the encoders as they were before feature_norm, for comparison
        old = EncoderConfig.from_dict({**model.encoder_config.to_dict(), "feature_norm": False})
        fresh = {"fresh": MultimodalEncoders(EncoderConfig.from_dict({**old.to_dict(), "feature_norm": True}),
                                             emb.shape[1], float(emb.std())),
                 "fresh without feature_norm": MultimodalEncoders(old, emb.shape[1], float(emb.std()))}
    report = {"checkpoint": args.checkpoint, "probes": {}, "scale": {}}
    for task in LABELS:
        xt, yt = items(train, task)
        xe, ye = items(evals, task)
        enc_name = "audio" if task in ("spoken_digit", "transcribe_word") else "image"
        row = {"raw input": probe_accuracy(xt.flatten(1).numpy(), yt, xe.flatten(1).numpy(), ye)}
        for label, encs in (*fresh.items(), ("trained", model.encoders)):
            enc = getattr(encs, enc_name)
            (ct, pt), (ce, pe) = stages(enc, xt), stages(enc, xe)
            row[f"{label} conv"] = probe_accuracy(ct, yt, ce, ye)
            row[f"{label} projected"] = probe_accuracy(pt.flatten(1).numpy(), yt, pe.flatten(1).numpy(), ye)
            report["scale"][f"{label} {enc_name} RMS"] = float(pe.pow(2).mean(-1).sqrt().mean())
            report["scale"][f"{label} {enc_name} varying share"] = varying_share(pe)
        row["chance"] = max(ye.count(v) for v in set(ye)) / len(ye)
        report["probes"][task] = row
        print(task, json.dumps(row), flush=True)
    report["scale"]["token embeddings"] = float(emb.pow(2).mean(-1).sqrt().mean())
    print("scale", json.dumps(report["scale"]), flush=True)
    report.update(gradients_and_attention(model, tok, train))
    report["drift"] = drift(model, tok, evals)
    report["oracle_digit_read"] = oracle(model, tok, evals)
    print("oracle", json.dumps(report["oracle_digit_read"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", args.out)


@torch.no_grad()
def drift(model, tok, evals) -> dict:
    """{layer: RMS and cosine with the input, at media and at text positions} over image and audio prompts."""
    from moelora.data.media import MultimodalCollator, encode_multimodal_examples

    rows = [ex for t in ("digit_read", "spoken_digit") for ex in [e for e in evals if e["task"] == t][:16]]
    batch = MultimodalCollator(tok.pad_token_id)(encode_multimodal_examples(tok, rows, 128, model.media_tokens))
    batch = {k: v for k, v in batch.items() if k != "task"}
    model.eval()
    hidden = model(**batch, output_hidden_states=True).hidden_states
    media = batch["media_mask"] != 0
    where = {"media": media, "text": (batch["attention_mask"] != 0) & ~media}
    out = {}
    for layer, h in enumerate(hidden):
        out[layer] = {f"{k} {stat}": round(float(v), 4) for k, m in where.items() for stat, v in (
            ("RMS", h[m].pow(2).mean(-1).sqrt().mean()),
            ("cos to input", torch.nn.functional.cosine_similarity(h[m], hidden[0][m], dim=-1).mean()))}
    print("drift", json.dumps({k: out[k] for k in (0, 1, 5, 10, len(hidden) - 1)}), flush=True)
    return out


def gradients_and_attention(model, tok, train) -> dict:
    from moelora.data.media import IMAGE, MultimodalCollator, encode_multimodal_examples

    rows = [ex for ex in train if ex["task"] in ("digit_read", "spoken_digit")][:16]
    enc = encode_multimodal_examples(tok, rows, 128, model.media_tokens)
    batch = MultimodalCollator(tok.pad_token_id)(enc)
    batch = {k: v for k, v in batch.items() if k != "task"}
    model.train()
    for name, p in model.named_parameters():  # load() returns a frozen model: make the adapter's part trainable
        p.requires_grad_("lora_" in name or "encoders." in name)
        p.grad = None
    out = model(**batch)
    out.loss.backward()
    groups = {"image conv": "encoders.image.conv", "image projector": "encoders.image.proj",
              "audio conv": "encoders.audio.conv", "audio projector": "encoders.audio.proj"}
    norms = {g: 0.0 for g in [*groups, "adapters"]}
    sizes = dict.fromkeys(norms, 0.0)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = next((g for g, pre in groups.items() if pre in name), "adapters")
        norms[g] += float(p.grad.pow(2).sum())
        sizes[g] += float(p.detach().pow(2).sum())
    grads = {g: {"grad_norm": norms[g] ** 0.5, "param_norm": sizes[g] ** 0.5} for g in norms}
    print("gradients", json.dumps(grads), flush=True)
    model.eval()
    attn = {}
    try:
        model.base_model.config._attn_implementation = "eager"
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
        labels = batch["labels"]
        first = (labels != -100).float().argmax(1) - 1  # the position that predicts the first answer token
        kinds = batch["media_mask"]
        for li, a in enumerate(out.attentions):
            a = a.mean(1)  # [B, T, T], heads averaged
            q = a[torch.arange(a.shape[0]), first]  # [B, T]
            share = (q * (kinds != 0)).sum(-1) / q.sum(-1)
            attn[li] = float(share.mean())
        print("attention share on media positions", json.dumps(attn), flush=True)
    except Exception as e:  # attention read-out is a diagnostic only
        attn = {"error": repr(e)}
    return {"gradients": grads, "attention_share_on_media": attn}


@torch.no_grad()
def oracle(model, tok, evals) -> dict:
    """Answers of the base LM (adapters off, encoders replaced) that contain the digit shown, out of n."""
    from moelora.evaluation import evaluate_exact_match

    rows = [dict(ex, images=[torch.full_like(ex["images"][0], float(ex["response"]))])
            for ex in evals if ex["task"] == "digit_read"]  # the picture carries its digit in every pixel
    emb = model.base_model.get_input_embeddings().weight
    digit_ids = torch.tensor([tok(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)])
    image, n_tokens = model.encoders.image, model.media_tokens["image"]
    out = {"n": len(rows)}
    for mode in ("digit embeddings", "zeros"):
        def encode(x, mode=mode):
            t = emb[digit_ids[x[:, 0, 0, 0].long()]].unsqueeze(1).expand(-1, n_tokens, -1)
            return t if mode == "digit embeddings" else torch.zeros_like(t)
        image.forward = encode
        for layer in model.adapter_layers().values():
            layer.adapter_enabled = False
        r = evaluate_exact_match(model, tok, rows, batch_size=32, max_new_tokens=8, progress=False)
        out[mode] = sum(p["target"] in p["prediction"] for p in r["predictions"])
    del image.forward
    for layer in model.adapter_layers().values():
        layer.adapter_enabled = True
    return out


if __name__ == "__main__":
    main()
