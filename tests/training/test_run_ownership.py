"""Issue 14: an output folder belongs to one run, and nothing of a run is lost or silently mixed.

Concurrent runs (a lock, stale locks of dead processes), overwrite_output_dir (nothing of the old run
survives), resume (only the folder's own run, only with its config, refused before anything is written),
the final adapter saved before the final evaluation, Ctrl-C (exit 130 naming what was saved), a full disk,
and housekeeping (orphan temporary folders, log lines after the resumed step, final_loss).
"""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import moelora
from moelora.base_models import resolve_base_model
from moelora.errors import ConfigError
from moelora.training.output_dir import LOCK_NAME, RunLock
from moelora.training.state import list_checkpoints
from tests.processes import REPO, accelerate_launch, run
from tests.training.test_train_cli import SMORA, TINY, _log, _run, train

QUIET = ["eval_before_training=false", "data.n_eval_per_task=0"]
LORA = "method={name: lora, r: 4, alpha: 8}"


def _snapshot(folder: Path) -> dict:
    """Every file under `folder` with its content hash: what "nothing was rewritten" compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _popen(out, *extra):
    # SIGINT back to its default in the child: a test run started in the background (`pytest &`) inherits an
    # ignored SIGINT, and Python then never turns Ctrl-C into KeyboardInterrupt
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, SMORA, f"output_dir={out}", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, proc, seconds=120):
    deadline = time.time() + seconds
    while not predicate() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert predicate(), f"timed out (process exit code {proc.poll()})"


# --- one run per folder --------------------------------------------------------------------------
def test_a_second_concurrent_run_into_one_folder_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = _popen(out, "max_steps=100000", *QUIET)
    try:
        _wait_for(lambda: (out / LOCK_NAME).is_file(), first)
        second = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, SMORA, f"output_dir={out}",
                                 "max_steps=2", *QUIET], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another run (pid {first.pid} on" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and first.poll() is None
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # The killed run left its lock behind; its process is gone, so the next run takes the folder over.
    assert (out / LOCK_NAME).is_file()
    summary = _run(out, "max_steps=1", *QUIET)
    assert summary["steps"] == 1 and not (out / LOCK_NAME).exists()  # released at the end


def test_lock_is_refused_while_its_process_lives_and_taken_once_it_is_gone(tmp_path):
    lock = RunLock(tmp_path / LOCK_NAME)
    lock.acquire()
    with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getpid()}"):
        RunLock(tmp_path / LOCK_NAME).acquire()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": lock.me["host"], "since": "then"}))
    taker = RunLock(tmp_path / LOCK_NAME)
    taker.acquire()  # stale: same host, no such process
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    taker.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "another-machine", "since": "then"}))
    with pytest.raises(ConfigError, match="on another-machine"):  # cannot be checked from here: refused
        RunLock(tmp_path / LOCK_NAME).acquire()


def test_overwrite_output_dir_leaves_nothing_of_the_old_run(tmp_path):
    out = tmp_path / "run"
    _run(out, "max_steps=4", "save_steps=1", "save_total_limit=10", "report_to=[jsonl, tensorboard]")
    (out / ".checkpoint-9.tmp-abc").mkdir()
    old_events = {p.name for p in (out / "tensorboard").rglob("*") if p.is_file()}
    assert len(list_checkpoints(out)) == 3 and (out / "eval_base.json").is_file() and old_events

    _run(out, "overwrite_output_dir=true", "max_steps=2", "data.tasks=[add]", "report_to=[jsonl, tensorboard]",
         "save_steps=1")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]  # the old checkpoint-1..3 are gone
    assert [r["step"] for r in _log(out) if "loss" in r] == [1, 2]
    assert set(json.loads((out / "eval_base.json").read_text())["per_task"]) == {"add"}  # not the old tasks
    assert set(json.loads((out / "eval_results.json").read_text())["base"]["per_task"]) == {"add"}
    new_events = {p.name for p in (out / "tensorboard").rglob("*") if p.is_file()}
    assert new_events and not new_events & old_events
    assert not list(out.glob(".checkpoint-*"))
    assert json.loads((out / "adapter/manifest.json").read_text())["metrics"]["steps"] == 2
    # and resuming now continues the new run, not the old one
    assert train.cli([*TINY, SMORA, f"output_dir={out}", "max_steps=3", "data.tasks=[add]",
                      "resume_from_checkpoint=true", "report_to=[jsonl]"]) == 0
    assert [r["step"] for r in _log(out) if "loss" in r] == [1, 2, 3]


def test_resume_and_overwrite_of_the_same_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _run(out, "max_steps=2", "save_steps=1", *QUIET)
    before = _snapshot(out)
    assert train.cli([*TINY, SMORA, f"output_dir={out}", "max_steps=2", *QUIET, "resume_from_checkpoint=true",
                      "overwrite_output_dir=true"]) == 2
    assert "config key 'overwrite_output_dir': would delete" in capsys.readouterr().err
    assert _snapshot(out) == before


# --- resume only continues the folder's own run, with its config ------------------------------------
def test_resuming_another_runs_checkpoint_into_a_finished_run_is_refused(tmp_path, capsys):
    mine, other = tmp_path / "smora", tmp_path / "lora"
    _run(mine, "max_steps=2", *QUIET)
    train.main([*TINY, LORA, f"output_dir={other}", "max_steps=2", "save_steps=1", *QUIET])
    before = _snapshot(mine)
    code = train.cli([*TINY, LORA, f"output_dir={mine}", "max_steps=2", *QUIET,
                      f"resume_from_checkpoint={other / 'checkpoint-1'}"])
    err = capsys.readouterr().err
    assert code == 2 and "config key 'resume_from_checkpoint'" in err and "belongs to another run" in err, err
    assert _snapshot(mine) == before  # adapter, run_config.json and log untouched
    # into a new folder it is fine: the run continues there
    assert train.cli([*TINY, LORA, f"output_dir={tmp_path / 'fresh'}", "max_steps=2", *QUIET,
                      f"resume_from_checkpoint={other / 'checkpoint-1'}"]) == 0


@pytest.mark.parametrize("changed,key", [
    ("method={name: smora, r: 8, k: 2, alpha: 8, bias_update_rate: 1.0}", "method.alpha"),
    (LORA, "method.name"),
    ("learning_rate=1e-3", "learning_rate"),
])
def test_resume_with_another_config_is_refused_before_anything_is_written(tmp_path, capsys, changed, key):
    out = tmp_path / "run"
    _run(out, "max_steps=3", "save_steps=1", "save_total_limit=5", *QUIET)
    before = _snapshot(out)
    capsys.readouterr()
    code = train.cli([*TINY, SMORA, changed, f"output_dir={out}", "max_steps=3", *QUIET,
                      "resume_from_checkpoint=true"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: config key '{key}': is ") and "checkpoint-2 was trained with" in err, err
    assert len(err.splitlines()) == 1
    assert _snapshot(out) == before  # run_config.json included


def test_resume_may_change_how_long_and_how_often(tmp_path):
    out = tmp_path / "run"
    _run(out, "max_steps=2", "save_steps=1", *QUIET)
    summary = _run(out, "max_steps=4", "save_steps=3", "logging_steps=2", "save_total_limit=4",
                   "report_to=[jsonl]", "resume_from_checkpoint=true", *QUIET)
    assert summary["steps"] == 4


# --- nothing of the training is lost at the end ------------------------------------------------------
def _failing_evaluation(monkeypatch, exc):
    import moelora.evaluation

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(moelora.evaluation, "evaluate_exact_match", fail)


def test_a_crash_in_the_final_evaluation_leaves_the_adapter(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _failing_evaluation(monkeypatch, IndexError("index out of range in self"))
    with pytest.raises(IndexError):
        _run(out, "max_steps=2", "eval_before_training=false")
    assert f"note: the trained adapter was saved to {out / 'adapter'}" in capsys.readouterr().err
    model = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], out / "adapter")
    assert model.adapter_layers()
    assert json.loads((out / "adapter/manifest.json").read_text())["metrics"]["steps"] == 2
    assert not (out / LOCK_NAME).exists()


def test_ctrl_c_in_the_final_evaluation_exits_130_naming_the_saved_adapter(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _failing_evaluation(monkeypatch, KeyboardInterrupt())
    assert train.cli([*TINY, SMORA, f"output_dir={out}", "max_steps=2", "eval_before_training=false"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the training's progress bar
    assert err == f"interrupted: the trained adapter is saved in {out / 'adapter'} (the final evaluation did not finish)"
    assert (out / "adapter/adapter_model.safetensors").is_file()


def test_ctrl_c_during_training_exits_130_naming_the_newest_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _popen(out, "max_steps=100000", "save_steps=1", "save_total_limit=2", *QUIET)
    _wait_for(lambda: bool(list_checkpoints(out)), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"interrupted: stopped; the newest checkpoint is {out}/checkpoint-"), err[-2000:]
    assert "Traceback" not in err and not (out / LOCK_NAME).exists()


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    import moelora.checkpoint

    real, calls = moelora.checkpoint.save_file, []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 2:  # checkpoint-1 (adapter + training state) is written; checkpoint-2 is not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(moelora.checkpoint, "save_file", save_file)
    out = tmp_path / "run"
    code = train.cli([*TINY, SMORA, f"output_dir={out}", "max_steps=4", "save_steps=1", *QUIET])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert err.splitlines()[-1].startswith(f"error: cannot write {out / 'checkpoint-2'}: No space left on device")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"] and not list(out.glob(".checkpoint-*"))


# --- housekeeping ------------------------------------------------------------------------------------
def test_orphan_temporary_folders_are_removed_when_a_run_starts(tmp_path):
    out = tmp_path / "run"
    _run(out, "max_steps=2", "save_steps=1", *QUIET)
    (out / ".checkpoint-6.tmp-abc").mkdir()
    (out / ".checkpoint-6.tmp-abc" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (out / ".adapter.old-123").mkdir()
    _run(out, "max_steps=3", "resume_from_checkpoint=true", *QUIET)
    assert not list(out.glob(".checkpoint-*")) and not list(out.glob(".adapter.*"))


def test_log_has_each_step_once_after_a_resume(tmp_path):
    out = tmp_path / "run"
    _run(out, "max_steps=4", "save_steps=2", *QUIET)
    (out / "adapter").rename(tmp_path / "gone")  # as if killed after logging step 4, before the final save
    _run(out, "max_steps=4", "save_steps=2", "resume_from_checkpoint=true", *QUIET)
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]


def test_final_loss_does_not_depend_on_where_the_run_resumed(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["max_steps=6", "logging_steps=3", *QUIET]
    _run(straight, *common)
    _run(resumed, *common, "save_steps=5")
    (resumed / "adapter").rename(tmp_path / "gone")
    _run(resumed, *common, "save_steps=5", "resume_from_checkpoint=true")
    want = json.loads((straight / "adapter/manifest.json").read_text())["metrics"]["final_loss"]
    got = json.loads((resumed / "adapter/manifest.json").read_text())["metrics"]["final_loss"]
    assert got == pytest.approx(want, abs=1e-6)  # the last step's loss, not the last log window's mean


@pytest.mark.slow
def test_with_two_processes_the_main_one_holds_the_lock_and_a_refusal_stops_both(tmp_path):
    from tests.training.test_distributed import ARGS

    out = tmp_path / "run"

    def launch(*extra):
        cmd = accelerate_launch(2, REPO / "train.py", *ARGS, f"output_dir={out}", "max_steps=2", *extra)
        return run(cmd, timeout=300, check=False)

    out.mkdir()
    held = RunLock(out / LOCK_NAME)  # this test's own (live) process holds the folder
    held.acquire()
    refused = launch()  # the main process finds the live lock; the other one must stop too, not hang
    assert refused.returncode != 0 and not (out / "run_config.json").exists()
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"is in use by another run (pid {os.getpid()} on" in errors[0], refused.stderr[-3000:]
    held.release()
    done = launch()
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter").is_dir() and not list(out.glob(f"{LOCK_NAME}*"))  # one lock, released at the end
