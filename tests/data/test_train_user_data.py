"""train.py on user chat files (no task field, ShareGPT + messages): eval loss, grad_norm and eval/average logged."""

import json
import math
import sys

from tests.processes import REPO

sys.path.insert(0, str(REPO))
import train  # noqa: E402

SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                              {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
CHAT = {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_on_user_chat_files_logs_eval_loss_grad_norm_and_average(tmp_path):
    tr = _jsonl(tmp_path / "train.jsonl", [SHAREGPT, CHAT] * 4)
    ev = _jsonl(tmp_path / "eval.jsonl", [CHAT, {"task": "qa", "instruction": "1+1?", "response": "2"}])
    out = tmp_path / "run"
    summary = train.main(["base_model=tiny-random-llama", "method={name: smora, r: 4, k: 2}", f"output_dir={out}",
                          f"data.train_files=[{tr}]", f"data.eval_files=[{ev}]", "data.max_length=64",
                          "per_device_train_batch_size=4", "max_steps=3", "logging_steps=1", "report_to=[jsonl]",
                          "eval_strategy=steps", "eval_steps=1", "eval_max_new_tokens=4"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in log if "loss" in r]
    assert len(train_records) == 3 and all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) for r in train_records)
    evals = [r for r in log if "eval/loss" in r]
    assert [r["step"] for r in evals] == [1, 2]  # at eval_steps before the end (the final one: eval_results.json)
    for r in evals:
        assert set(r) == {"step", "eval/default", "eval/qa", "eval/average", "eval/loss", "eval/perplexity"}
        assert r["eval/average"] == (r["eval/default"] + r["eval/qa"]) / 2
        assert r["eval/perplexity"] == math.exp(r["eval/loss"])
    # Only the user files were trained on and scored (no built-in task), with the loss in the final results.
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["trained"]["per_task"]) == {"default", "qa"}
    assert results["trained"]["loss"] == summary["eval_loss"]["trained"] != evals[-1]["eval/loss"]
    assert set(results["trained"]) == {"per_task", "average", "n", "loss", "perplexity"}
    assert results["base"]["loss"] == summary["eval_loss"]["base"] != results["trained"]["loss"]
    manifest = json.loads((out / "adapter" / "manifest.json").read_text())
    assert manifest["metrics"]["trained_eval_loss"] == results["trained"]["loss"]
    assert manifest["training_config"]["data"]["tasks"] == "none"
