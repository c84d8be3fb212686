"""lm-evaluation-harness scores a moelora checkpoint offline, on a custom task written here (YAML + JSONL)."""

import json
import subprocess
import sys

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from tests.conftest import randomize_adapters

lm_eval = pytest.importorskip("lm_eval")
DOCS = [{"question": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0},
        {"question": "sort 3 1 2:", "choices": [" 1 2 3", " 3 2 1"], "answer": 0},
        {"question": "upper ab:", "choices": [" AB", " ab"], "answer": 1}]


def write_task(folder):
    folder.mkdir()
    with open(folder / "docs.jsonl", "w") as f:
        for doc in DOCS:
            f.write(json.dumps(doc) + "\n")
    (folder / "tiny_choice.yaml").write_text(f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'docs.jsonl'}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (folder / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'docs.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return folder


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], moelora.SMoRAConfig(r=8, k=2),
                                      base_model_id="tiny-random-llama")
    randomize_adapters(model, seed=1, scale=0.3)
    model.save_pretrained(tmp_path / "adapter")
    return model.eval(), tmp_path / "adapter"


def _loglikelihood(model, tokenizer, context, continuation):
    ctx, cont = tokenizer(context)["input_ids"], tokenizer(continuation)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_simple_evaluate_scores_the_adapter(checkpoint, tmp_path):
    import moelora.lm_eval  # noqa: F401  (registers the "moelora" model type)
    from lm_eval.tasks import TaskManager

    model, adapter = checkpoint
    tasks = TaskManager(include_path=str(write_task(tmp_path / "tasks")))
    out = lm_eval.simple_evaluate(model="moelora", model_args=f"pretrained=tiny-random-llama,adapter={adapter}",
                                  tasks=["tiny_choice", "tiny_gen"], task_manager=tasks, log_samples=True,
                                  batch_size=2)
    tokenizer = resolve_base_model("tiny-random-llama")[1]
    choice = out["samples"]["tiny_choice"]
    assert len(choice) == len(DOCS)
    for sample in choice:  # every choice's log-likelihood is this adapter's, not the base model's
        doc = sample["doc"]
        got = [r[0][0] for r in sample["resps"]]
        want = [_loglikelihood(model, tokenizer, doc["question"], c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-3)
        with model.disable_adapter():
            base = [_loglikelihood(model, tokenizer, doc["question"], c) for c in doc["choices"]]
        assert abs(got[0] - base[0]) > 1e-3
    assert 0.0 <= out["results"]["tiny_choice"]["acc,none"] <= 1.0
    assert len(out["samples"]["tiny_gen"]) == len(DOCS) and "exact_match,none" in out["results"]["tiny_gen"]


@pytest.mark.slow
def test_command_line_with_the_base_from_the_manifest(checkpoint, tmp_path):
    _, adapter = checkpoint
    write_task(tmp_path / "tasks")
    proc = subprocess.run([sys.executable, "-m", "moelora.lm_eval", "run", "--model", "moelora", "--model_args",
                           f"adapter={adapter}", "--tasks", "tiny_choice", "--include_path", str(tmp_path / "tasks"),
                           "--output_path", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                             "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny_choice" in proc.stdout and "acc" in proc.stdout
