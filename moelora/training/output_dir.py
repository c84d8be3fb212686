"""An output folder belongs to one run: a lock while it trains, resume only of its own run, a clean overwrite.

`claim_output_dir` runs once per training run on the main process, before anything of the run is written:
it refuses a folder that holds another run (unless told to overwrite it or to resume it), a resume whose run
config differs from the checkpoint's, and a folder another live run holds; only then does it take the lock,
clear what an overwrite replaces, remove what killed saves left behind, cut the log back to the resumed step
and write `run_config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from pathlib import Path

from ..checkpoint import ORPHAN_PATTERNS
from ..errors import ConfigError, short_repr
from .state import list_checkpoints, saved_training_config

LOCK_NAME = ".run.lock"
# Everything a run writes into its folder: what overwrite_output_dir clears (other files are the user's).
RUN_FILES = ("adapter", "tensorboard", "log.jsonl", "eval_base.json", "eval_results.md", "eval_results.json",
             "run_config.json")
RUN_GLOBS = ("checkpoint-*", *ORPHAN_PATTERNS)
# Run config keys a resume may change: how long to train, how often to log/save/evaluate, where metrics go,
# and how this process runs. Anything else (method, data, optimizer, seed...) would silently train another
# model from the checkpoint's weights, so it must match the checkpoint's saved config.
RESUME_MAY_CHANGE = {"max_steps", "num_train_epochs", "logging_steps", "save_steps", "save_total_limit",
                     "report_to", "num_threads", "output_dir", "overwrite_output_dir", "resume_from_checkpoint",
                     "compile", "compile_mode", "logits_on_supervised_only", "per_device_eval_batch_size", "save_dtype", "save_format",
                     "router_collapse_entropy", "router_collapse_stop"}


def holds_run(output_dir: Path) -> bool:
    """A folder "holds a run" once it has something to lose: a checkpoint or a saved adapter."""
    return (output_dir / "adapter").exists() or bool(list_checkpoints(output_dir))


def check_output_dir(output_dir: Path, cfg, resume: Path | None) -> None:
    """Every refusal, before anything is written (raises ConfigError naming the key)."""
    own_checkpoint = resume is not None and resume.resolve().parent == output_dir.resolve()
    if cfg.overwrite_output_dir and own_checkpoint:
        raise ConfigError("overwrite_output_dir", f"would delete {resume}, the checkpoint resume_from_checkpoint "
                          "continues; drop one of the two")
    if holds_run(output_dir) and not cfg.overwrite_output_dir:
        if resume is None:
            raise ConfigError("output_dir", f"{output_dir} already holds a run; pass resume_from_checkpoint=true "
                              "to continue it, overwrite_output_dir=true to replace it, or choose another output_dir")
        if not own_checkpoint:
            raise ConfigError("resume_from_checkpoint", f"{resume} belongs to another run than the one {output_dir} "
                              "holds; resume it into its own folder or a new output_dir (or pass "
                              "overwrite_output_dir=true to replace this folder's run)")
    if resume is not None:
        saved = saved_training_config(resume)
        if saved is not None:
            check_resume_config(_json(cfg.to_dict()), saved, resume, section_defaults(cfg))


def _json(value):
    return json.loads(json.dumps(value))


def section_defaults(cfg) -> dict:
    """Flattened `data.*`, `method.*` and `encoders.*` keys -> what a checkpoint saved before the key existed
    meant by leaving it out (JSON values): the class default, or the old behaviour where the default changed
    (StrictConfig._before_key, e.g. encoders.feature_norm: false)."""
    out = {}
    for section, obj in (("data", cfg.data), ("method", cfg.method_config), ("encoders", cfg.encoders)):
        for f in dataclasses.fields(obj):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                continue
            try:
                out[f"{section}.{f.name}"] = _json(type(obj).value_before_key(f))
            except TypeError:  # not a JSON value: no saved config can hold it either
                continue
    return out


def continue_data_selection(cfg, resume: Path | None) -> str | None:
    """With data.tasks left at auto, a resume continues the built-in tasks its checkpoint trained on.

    Runs saved before auto existed trained with data.tasks "all" (the old default: user files mixed with the
    built-in suite); the same command now resolves auto to "none" with train_files. The checkpoint's selection
    is what that run trains on, so it is kept (an explicit data.tasks is compared as any key). Returns the
    line to print when it changed what auto resolved to, else None."""
    if resume is None or not getattr(cfg.data, "tasks_left_auto", False):
        return None
    saved = ((saved_training_config(resume) or {}).get("data") or {}).get("tasks")
    valid = saved in ("all", "none") or (isinstance(saved, list) and all(isinstance(t, str) for t in saved))
    if not valid or saved == cfg.data.tasks:
        return None  # nothing to continue, or a value the comparison will name
    resolved, cfg.data.tasks = cfg.data.tasks, saved
    return (f"data.tasks: continuing {short_repr(saved)}, the built-in tasks checkpoint {resume} trained on "
            f"(auto would choose {short_repr(resolved)} for a new run)")


def check_resume_config(now: dict, saved: dict, resume: Path, defaults: dict | None = None) -> None:
    """Refuse a resume whose run config differs from the checkpoint's, naming the first differing key.
    `defaults` (flattened keys -> default values): a method/data/encoders key the checkpoint does not name
    was added by a later moelora, and its default keeps the old behaviour, so it passes at its default."""
    a, b = _flatten(now), _flatten(saved)
    defaults = defaults or {}
    for key in [*a, *(k for k in b if k not in a)]:
        if key.split(".")[0] in RESUME_MAY_CHANGE or key.startswith("eval_"):
            continue
        if (key not in a or key not in b) and not key.startswith(("method.", "data.", "encoders.")):
            continue  # a top-level key added or removed between versions of moelora
        if key not in b and key in defaults and a[key] == defaults[key]:
            continue  # a setting newer than the checkpoint, at the value that means what older versions did
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            was = (f"{short_repr(defaults[key])} (it predates the key)" if key not in b and key in defaults
                   else short_repr(b.get(key, "<unset>")))
            raise ConfigError(key, f"is {short_repr(a.get(key, '<unset>'))} but checkpoint {resume} was trained "
                              f"with {was}; a resume continues that run, so only "
                              "how long it trains, logs, saves and evaluates may change (start a new output_dir "
                              "to train with other settings)")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("method", "data", "encoders") or (prefix and isinstance(v, dict)):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def claim_output_dir(output_dir: Path, cfg, resume: Path | None, resumed_step: int | None) -> RunLock:
    """Check, lock, then prepare `output_dir` for this run; returns the held lock (release it at the end)."""
    check_output_dir(output_dir, cfg, resume)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("output_dir", f"cannot write to {output_dir}: {exc.strerror or exc}") from None
    lock = RunLock(output_dir / LOCK_NAME)
    lock.acquire()
    try:
        if cfg.overwrite_output_dir:
            clear_run(output_dir)
        remove_orphans(output_dir)
        if resumed_step is not None:
            truncate_log(output_dir / "log.jsonl", resumed_step)
        else:  # a fresh run: no stale base scores (another base or task set) and no old log lines
            for name in ("eval_base.json", "log.jsonl"):
                (output_dir / name).unlink(missing_ok=True)
        (output_dir / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    except OSError as exc:
        lock.release()
        raise ConfigError("output_dir", f"cannot write to {output_dir}: {exc.strerror or exc}") from None
    except BaseException:
        lock.release()
        raise
    return lock


def clear_run(output_dir: Path) -> None:
    """Remove everything a run wrote (checkpoints, adapter, logs, cached base scores, half-written saves)."""
    doomed = [output_dir / n for n in RUN_FILES] + [p for g in RUN_GLOBS for p in output_dir.glob(g)]
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def remove_orphans(output_dir: Path) -> list[Path]:
    """Delete `.checkpoint-N.tmp-*` / `.adapter.old-*` folders a killed save left (only under the lock: a live
    run's save in progress looks the same)."""
    found = [p for g in ORPHAN_PATTERNS for p in output_dir.glob(g) if p.is_dir()]
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def truncate_log(path: Path, step: int) -> None:
    """Drop log.jsonl lines after `step` (what a killed run logged past its last checkpoint): the resumed run
    logs those steps again, so each step appears once. A torn last line (killed mid-write) is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class RunLock:
    """A lock file naming the process that holds a folder: pid and host. A lock whose process is gone
    (same host, `os.kill(pid, 0)` finds no such process) is stale and taken over; one held by a live
    process, or by another host (which this one cannot check), is refused with exit code 2."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def acquire(self) -> None:
        record = json.dumps({**self.me, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        tmp.write_text(record + "\n")
        try:
            for _ in range(3):  # at most: taken, found stale and removed, taken again
                try:
                    os.link(tmp, self.path)  # atomic: creates the lock with its content, or fails if it exists
                    self.held = True
                    return
                except FileExistsError:
                    holder = self._holder()
                    if not self._stale(holder):
                        raise ConfigError("output_dir", f"{self.path.parent} is in use by another run (pid "
                                          f"{holder.get('pid')} on {holder.get('host')}, since "
                                          f"{holder.get('since')}); wait for it, or choose another output_dir "
                                          f"(if no such run is alive, delete {self.path})")
                    self._remove_stale(holder)
            raise ConfigError("output_dir", f"could not take the lock {self.path}: other runs keep taking it")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held and self._holder().get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != self.me["host"] or not isinstance(pid, int) or pid <= 0:
            return False  # another machine's run (or an unreadable lock): only a person can tell
        try:
            os.kill(pid, 0)  # signal 0: no signal, only "does this process exist"
        except ProcessLookupError:
            return True
        except PermissionError:  # it exists, under another user
            return False
        return False

    def _remove_stale(self, holder: dict) -> None:
        # Move it aside first and check it is still the stale one: another process may have replaced it.
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if json.loads(aside.read_text()) != holder:
                os.link(aside, self.path)  # not the one we judged: put it back (link fails if replaced again)
        except (OSError, ValueError):
            pass
        finally:
            aside.unlink(missing_ok=True)
