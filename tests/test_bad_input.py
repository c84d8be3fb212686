"""Bad input: one clear error each, exit code 2, no traceback, nothing overwritten (README table).

Each case is (id, setup, expected text). `setup(tmp)` returns the extra CLI arguments (train.py cases)
or runs a library call (loading cases). README's "Bad input" table lists these messages.
"""

import json
from pathlib import Path

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from tests.training.test_train_cli import REPO, SMORA, TINY, train


def _file(tmp, name, text):
    path = Path(tmp) / name
    path.write_text(text)
    return str(path)


def _rows(tmp, name, *rows):
    return _file(tmp, name, "".join(json.dumps(r) + "\n" for r in rows))


def _parquet_float_response(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(tmp) / "floats.parquet"
    pq.write_table(pa.table({"task": ["t"], "instruction": ["half of 3"], "response": [1.5]}), path)
    return str(path)


def _alias_bomb(tmp):
    """A YAML alias bomb: 10**6 strings when expanded (a billion with three more levels), in 2 kB of text."""
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcde", "bcdef"):
        levels.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
    return _file(tmp, "bomb.yaml", "seed: {" + ", ".join(levels) + "}\n")


def _empty_trainer_state(tmp):
    ckpt = Path(tmp) / "elsewhere" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    return str(ckpt)


MIXER_STAGE1 = "method={name: lora_mixer, experts: [add, reverse_word], stage: joint_stage1, r: 2}"


CLI_CASES = [
    ("unknown key", lambda t: ["learning_rat=1e-4"], "config key 'learning_rat': unknown key for RunConfig (did you mean 'learning_rate'?)"),
    ("misspelt method key", lambda t: ["method.kk=3"], "config key 'method.kk': unknown key for SMoRAConfig (did you mean 'k'?)"),
    ("misspelt data key", lambda t: ["data.max_lenght=64"], "config key 'data.max_lenght': unknown key for DataConfig (did you mean 'max_length'?)"),
    ("wrong type (int)", lambda t: ["per_device_train_batch_size=eight"], "config key 'per_device_train_batch_size': expected an integer, got 'eight'"),
    ("wrong type (bool)", lambda t: ["gradient_checkpointing=maybe"], "config key 'gradient_checkpointing': expected true/false, got 'maybe'"),
    ("k > r", lambda t: ["method={name: smora, r: 8, k: 16}"], "config key 'method.k': must be between 1 and r=8"),
    ("rank < 1", lambda t: ["method={name: lora, r: 0}"], "config key 'method.r': must be >= 1, got 0"),
    ("dropout out of range", lambda t: ["method={name: lora, dropout: 1.5}"], "config key 'method.dropout': must be in [0, 1)"),
    ("unknown method", lambda t: ["method={name: smoraa}"], "config key 'method.name': unknown method 'smoraa'"),
    ("no such target module", lambda t: ["method={name: lora, target_modules: [qproj]}"], "config key 'method.target_modules': no linear layer named 'qproj'"),
    ("unknown choice", lambda t: ["lr_scheduler_type=cosin"], "config key 'lr_scheduler_type': expected one of 'cosine'"),
    ("impossible value", lambda t: ["learning_rate=0"], "config key 'learning_rate': must be > 0"),
    ("max_steps 0", lambda t: ["max_steps=0"], "config key 'max_steps': must be >= 1"),
    ("eval_steps missing", lambda t: ["eval_strategy=steps"], "config key 'eval_steps': must be >= 1 when eval_strategy is 'steps'"),
    ("unknown metric sink", lambda t: ["report_to=[wandb]"], "config key 'report_to': unknown sink 'wandb'"),
    ("unknown base model", lambda t: ["base_model=smollm3"], "smollm3"),
    ("missing data file", lambda t: [f"data.train_files=[{t}/nope.jsonl]"], "nope.jsonl"),
    ("empty data file", lambda t: [f"data.train_files=[{_file(t, 'empty.jsonl', '')}]"], "empty.jsonl"),
    ("corrupt data file", lambda t: [f"data.train_files=[{_file(t, 'bad.jsonl', '{not json')}]"], "bad.jsonl"),
    ("data without task field, method routed by task", lambda t: [MIXER_STAGE1, f"data.train_files=[{_file(t, 'notask.jsonl', json.dumps({'instruction': 'a', 'response': 'b'}))}]"],
     "notask.jsonl', row index 0: missing or empty task field 'task' (method lora_mixer routes each row by its task label"),
    ("unknown built-in task", lambda t: ["data.tasks=[addition]"], "addition"),
    ("response longer than max_length", lambda t: ["data.max_length=8"], "does not fit max_length=8"),
    ("missing DeepSpeed config", lambda t: [f"deepspeed={t}/ds.json"], "config key 'deepspeed': file not found"),
    ("DDP comm hook under DeepSpeed", lambda t: [f"deepspeed={REPO}/configs/deepspeed/zero2.json", "ddp_comm_hook=fp16"],
     "config key 'ddp_comm_hook': applies to DDP only"),
    ("unknown DDP comm hook", lambda t: ["ddp_comm_hook=int8"], "ddp_comm_hook"),
    ("resume path is not a checkpoint", lambda t: [f"resume_from_checkpoint={t}"], "is not a complete training checkpoint"),
    ("resume with no checkpoint", lambda t: ["resume_from_checkpoint=true"], "resume_from_checkpoint: no checkpoint in"),
    ("unwritable output dir", lambda t: [f"output_dir={_file(t, 'a_file', 'x')}/run"], "config key 'output_dir': cannot write to"),
    ("invalid YAML config", lambda t: ["--config", _file(t, "bad.yaml", "method: [unclosed")], "is not valid YAML"),
    ("config is not a mapping", lambda t: ["--config", _file(t, "list.yaml", "- a\n- b\n")], "must hold a mapping of keys"),
    # issue 14, item 6: values that used to be accepted and silently trained something wrong
    ("negative max_grad_norm", lambda t: ["max_grad_norm=-1"], "config key 'max_grad_norm': must be >= 0 and finite (0 turns clipping off), got -1.0"),
    ("NaN max_grad_norm", lambda t: ["max_grad_norm=.nan"], "config key 'max_grad_norm': must be >= 0 and finite (0 turns clipping off), got nan"),
    ("zero epochs", lambda t: ["max_steps=-1", "num_train_epochs=0"], "config key 'num_train_epochs': must be > 0 and finite, got 0.0"),
    ("NaN learning rate", lambda t: ["learning_rate=.nan"], "config key 'learning_rate': must be > 0 and finite, got nan"),
    ("duplicate YAML key", lambda t: ["--config", _file(t, "dup.yaml", "max_steps: 1\nseed: 1\nmax_steps: 2\n")],
     "config key '--config': key 'max_steps' is given twice in one mapping, at line 3"),
    ("empty output_dir", lambda t: ["output_dir="], "config key 'output_dir': '' is not a run folder"),
    ("output_dir is the root", lambda t: ["output_dir=/"], "config key 'output_dir': '/' is not a run folder"),
    ("negative save_steps", lambda t: ["save_steps=-1"], "config key 'save_steps': must be >= 0 (0: never), got -1"),
    ("max_length beyond the model's positions", lambda t: ["data.max_length=1024"],
     "config key 'data.max_length': 1024 exceeds the 512 positions of base model tiny-random-llama"),
    ("generation beyond the model's positions", lambda t: ["eval_max_new_tokens=600"],
     "config key 'eval_max_new_tokens': 600 new tokens after the longest evaluation prompt"),
    # item 7: used to end in a traceback
    ("negative weight_decay", lambda t: ["weight_decay=-1"], "config key 'weight_decay': must be >= 0 and finite"),
    ("negative seed", lambda t: ["seed=-1"], "config key 'seed': must be in [0, 2**32 - 1]"),
    ("huge seed", lambda t: [f"seed={2**70}"], "config key 'seed': must be in [0, 2**32 - 1]"),
    ("negative num_threads", lambda t: ["num_threads=-1"], "config key 'num_threads': must be >= 0"),
    ("NaN epochs", lambda t: ["max_steps=-1", "num_train_epochs=.nan"], "config key 'num_train_epochs': must be > 0 and finite, got nan"),
    ("target regex that does not compile", lambda t: ['method={name: lora, target_modules: "(["}'],
     "config key 'method.target_modules': is not a valid regular expression"),
    ("rank too large to allocate", lambda t: ["method.r=10000000000"], "config key 'method': the adapter does not fit in memory"),
    ("override into a scalar", lambda t: ["method.r.foo=1"], "config key 'method.r.foo': 'method.r' holds a value (8), not a section"),
    ("override into a list", lambda t: ["method={name: lora, target_modules: [q_proj]}", "method.target_modules.0=k_proj"],
     "config key 'method.target_modules.0': 'method.target_modules' holds a value (['q_proj']), not a section"),
    ("YAML alias bomb", lambda t: ["--config", _alias_bomb(t)], "config key 'seed': expected an integer, got {'a': ['x'"),
    ("DeepSpeed file is not JSON", lambda t: [f"deepspeed={_file(t, 'ds.json', '{zero: 2')}"], "config key 'deepspeed': " ),
    ("DeepSpeed file holds a list", lambda t: [f"deepspeed={_file(t, 'ds.json', '[1, 2]')}"],
     "must hold a JSON object of DeepSpeed settings, got a list"),
    ("chat row with only an assistant message",
     lambda t: [f"data.train_files=[{_rows(t, 'chat.jsonl', {'task': 'a', 'messages': [{'role': 'assistant', 'content': 'hi'}]})}]"],
     "'messages' has nothing before its assistant message"),
    ("resume from an empty trainer state", lambda t: [f"resume_from_checkpoint={_empty_trainer_state(t)}"],
     "trainer_state.json: 'counters' must hold non-negative integers step, micro_step and skipped_steps, got None"),
    # item 8: words that named the wrong problem
    ("numeric task field", lambda t: [f"data.train_files=[{_rows(t, 'num.jsonl', {'task': 3, 'instruction': 'a', 'response': 'b'})}]"],
     "row index 0: task field 'task' must be a task name (a string), got int 3"),
    ("Parquet float column", lambda t: [f"data.train_files=[{_parquet_float_response(t)}]"],
     "row index 0: 'response' must be text (or an integer), got float 1.5"),
    ("directory named like a data file", lambda t: [f"data.train_files=[{(Path(t) / 'd.jsonl').mkdir() or Path(t) / 'd.jsonl'}]"],
     "d.jsonl' is a directory, not a file"),
    ("stage-1 task without an expert", lambda t: [MIXER_STAGE1],
     "config key 'method.experts': stage joint_stage1 routes each sample to the expert named after its task, and task 'sort_asc' has none"),
]


@pytest.mark.parametrize("case,setup,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_train_cli_bad_input(tmp_path, capsys, case, setup, message):
    extra = setup(tmp_path)
    args = [*TINY, SMORA, "max_steps=1", *extra]
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={tmp_path / 'out'}")
    code = train.cli(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err[:2000]
    assert err.startswith("error: ") and message in err, err[:2000]
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert len(err) < 800, f"the message prints {len(err)} characters"  # values are capped (short_repr)
    assert not (tmp_path / "out").exists(), "bad input must stop the run before anything is written"


@pytest.fixture
def saved(tmp_path):
    model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], moelora.SMoRAConfig(r=8, k=2))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _load(path):
    return moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], path)


def test_truncated_safetensors(saved):
    data = (saved / "adapter_model.safetensors").read_bytes()
    (saved / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(moelora.CheckpointError, match="corrupt or truncated safetensors file .*adapter_model.safetensors"):
        _load(saved)


def test_corrupt_safetensors(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(moelora.CheckpointError, match="corrupt or truncated safetensors"):
        _load(saved)


def test_pickle_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(moelora.CheckpointError, match="only pickle files .*never loads"):
        _load(folder)
    with pytest.raises(moelora.CheckpointError, match="pickle checkpoints can run arbitrary code"):
        moelora.checkpoint.load_tensors(folder / "adapter_model.bin")


def test_folder_without_adapter(tmp_path):
    with pytest.raises(moelora.CheckpointError, match="holds no adapter"):
        _load(tmp_path)
    with pytest.raises(moelora.CheckpointError, match="adapter folder not found"):
        _load(tmp_path / "missing")


def test_corrupt_adapter_config(saved):
    (saved / "moelora_config.json").write_text("{oops")
    with pytest.raises(moelora.CheckpointError, match="moelora_config.json is not valid JSON"):
        _load(saved)


def test_adapter_config_with_bad_value(saved):
    meta = json.loads((saved / "moelora_config.json").read_text())
    meta["config"]["k"] = 99
    (saved / "moelora_config.json").write_text(json.dumps(meta))
    with pytest.raises(moelora.ConfigError, match="moelora_config.json.k"):
        _load(saved)


def test_out_of_range_token_ids(tiny_llama):
    model = moelora.get_moelora_model(tiny_llama[0], moelora.LoRAConfig(r=2))
    with pytest.raises(moelora.DataError, match="token id 5000, outside the model's vocabulary of 320"):
        model(input_ids=torch.tensor([[1, 5000]]))


# issue 14, item 7: saved files with wrongly typed fields are one CheckpointError naming the file
def test_adapter_config_with_null_config(saved):
    meta = json.loads((saved / "moelora_config.json").read_text())
    meta["config"] = None
    (saved / "moelora_config.json").write_text(json.dumps(meta))
    with pytest.raises(moelora.CheckpointError, match="moelora_config.json: 'config' must be a JSON object .*got None"):
        _load(saved)


def test_manifest_that_is_a_list(saved):
    (saved / "manifest.json").write_text("[1, 2]")
    with pytest.raises(moelora.CheckpointError, match="manifest .*manifest.json must hold a JSON object, got a list"):
        _load(saved)
    with pytest.raises(moelora.CheckpointError, match="must hold a JSON object, got a list"):
        moelora.load(saved)


def test_peft_config_with_a_wrongly_typed_rank(tmp_path):
    model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0],
                                      moelora.LoRAConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    cfg["r"] = "x"
    (tmp_path / "peft/adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(moelora.CheckpointError, match="adapter_config.json has a missing or wrongly typed field"):
        _load(tmp_path / "peft")


def test_evaluate_out_naming_a_file_is_refused_before_scoring(saved, tmp_path, capsys):
    import evaluate

    (tmp_path / "results").write_text("not a folder")
    code = evaluate.cli(["--checkpoint", str(saved), "--base-model", "tiny-random-llama", "--tasks", "add",
                         "--out", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: config key '--out': {tmp_path / 'results'} is a file; --out names the folder the results go to"
