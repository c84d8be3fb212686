"""A run started by an older moelora resumes with the command that started it.

Before data.tasks=auto, the default was data.tasks "all": a run with data.train_files trained on the user's
files mixed with the built-in tasks, and its checkpoints saved tasks "all" and no data.default_task (added
with auto). The same command now resolves auto to "none"; the resume must continue the run on the data it
trained on, not be refused as a data.tasks mismatch (nor as a missing data.default_task).
"""

import json
from pathlib import Path

from tests.training.test_train_cli import TINY, train

LORA = "method={name: lora, r: 4, alpha: 8}"


def _old_command(tmp_path: Path) -> list[str]:
    rows = [{"task": "mine", "instruction": f"echo {i}", "response": str(i)} for i in range(16)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = [a for a in TINY if not a.startswith("data.tasks=")]  # the old command named no data.tasks
    return [*tiny, LORA, f"data.train_files=[{data}]", "data.n_train_per_task=4", "data.n_eval_per_task=0",
            "eval_before_training=false", f"output_dir={tmp_path / 'run'}"]


def _make_old_style(out: Path) -> None:
    """Rewrite the saved run configs as a moelora before data.tasks=auto wrote them."""
    for path in [out / "run_config.json", *out.glob("checkpoint-*/adapter/manifest.json")]:
        saved = json.loads(path.read_text())
        config = saved.get("training_config", saved)
        assert config["data"]["tasks"] == "all"
        del config["data"]["default_task"]
        path.write_text(json.dumps(saved))


def test_the_command_that_started_an_old_run_resumes_it_on_its_own_data(tmp_path, capsys):
    command = _old_command(tmp_path)
    out = tmp_path / "run"
    # what the old default did: built-in tasks mixed with the user's files, saved as data.tasks "all"
    train.main([*command, "data.tasks=all", "max_steps=2", "save_steps=1"])
    _make_old_style(out)

    summary = train.main([*command, "max_steps=3", "resume_from_checkpoint=true"])
    assert summary["steps"] == 3
    assert "data.tasks: continuing" in capsys.readouterr().out  # says which selection it continued
    manifest = json.loads((out / "adapter" / "manifest.json").read_text())
    assert manifest["training_config"]["data"]["tasks"] == "all"  # still trained on what it trained on

    # asking for other data explicitly is still another run: refused, naming the key
    code = train.cli([*command, "data.tasks=none", "max_steps=4", "resume_from_checkpoint=true"])
    err = capsys.readouterr().err
    assert code == 2 and "config key 'data.tasks': is 'none'" in err, err


def test_a_multimodal_run_from_before_feature_norm_and_positions_resumes_only_as_it_was(tmp_path, capsys):
    """encoders.feature_norm and encoders.position_embedding default to true, but a checkpoint saved before they
    existed trained encoders without them: resumed under the new defaults, the features would silently change
    under the trained weights. The resume is refused, naming the key and the value it must keep."""
    from tests.tiny_runs import MULTIMODAL, TINY_RUN

    out = tmp_path / "run"
    command = [*TINY_RUN, *MULTIMODAL, "data.tasks=[digit_read, spoken_digit]", "data.n_train_per_task=4",
               "data.n_eval_per_task=0", "eval_before_training=false", "encoders.image_width=8",
               "encoders.audio_width=8", LORA, f"output_dir={out}"]
    old = ["encoders.feature_norm=false", "encoders.position_embedding=false"]
    train.main([*command, *old, "max_steps=2", "save_steps=1"])
    for path in [out / "run_config.json", *out.glob("checkpoint-*/adapter/manifest.json"),
                 *out.glob("checkpoint-*/adapter/moelora_config.json")]:  # as a moelora before the two keys
        saved = json.loads(path.read_text())
        encoders = saved.get("training_config", saved)["encoders"]
        del encoders["feature_norm"], encoders["position_embedding"]
        path.write_text(json.dumps(saved))

    code = train.cli([*command, "max_steps=3", "resume_from_checkpoint=true"])
    err = capsys.readouterr().err
    assert code == 2 and "config key 'encoders.feature_norm': is True" in err and "predates the key" in err, err
    assert train.main([*command, *old, "max_steps=3", "resume_from_checkpoint=true"])["steps"] == 3
