"""User data files (JSON lines / JSON / Parquet) loaded with `datasets` and normalised to examples.

Each row is instruction style (``instruction`` + optional ``input`` + ``response`` or ``output``),
OpenAI chat style (``messages``: a list of ``{"role", "content"}``) or ShareGPT style (``conversations``:
a list of ``{"from", "value"}`` with ``from`` one of human/gpt/system, or user/assistant). A row may name
its task (``task`` by default); rows without one get ``default_task``, unless the caller requires a task
(methods that route by task label). An instruction row may carry ``"template": "plain"`` (its instruction
is the whole prompt, no chat template: caption pre-training data, as the built-in align stage's). Rows come
back as ``{"task", "instruction", "response"}`` (+ ``"template"``) or ``{"task", "messages"}``, ready for
:mod:`moelora.data.formatting`. Bad input raises ``DataError`` naming the file (and the first bad row index).
"""

from __future__ import annotations

import logging
import os
import tempfile

from moelora.data.formatting import PLAIN
from moelora.errors import DataError, short_repr

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# ShareGPT speaker names -> chat roles (ShareGPT exports use human/gpt; some use the OpenAI names).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
DEFAULT_TASK = "default"  # the task of rows that name none (per-task metrics then show one row)


def load_user_data(paths: list[str] | str, task_field: str = "task", default_task: str = DEFAULT_TASK,
                   task_required_by: str | None = None) -> list[dict]:
    """Load and validate every file in ``paths``; returns the concatenated normalised examples.

    A row without a task field gets ``default_task``; with ``task_required_by`` (why a task is needed, e.g.
    "method lora_mixer routes each row by its task") such a row is an error naming the file and row."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data files given")
    out: list[dict] = []
    for path in paths:
        rows = _read_rows(os.fspath(path))
        out.extend(_normalise(path, i, row, task_field, default_task, task_required_by)
                   for i, row in enumerate(rows))
    return out


def _read_rows(path: str) -> list[dict]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise DataError(f"data file '{path}': unsupported extension '{ext}'; use .jsonl, .json or .parquet")
    if os.path.isdir(path):
        raise DataError(f"data file '{path}' is a directory, not a file")
    if not os.path.isfile(path):
        raise DataError(f"data file '{path}' does not exist")
    if _is_blank(path):
        raise DataError(f"data file '{path}' is empty")
    import datasets

    # datasets' builders write Arrow files into a cache; point that at a throwaway dir and keep the
    # table in memory, so nothing piles up in ~/.cache and stale caches can never be reused.
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    # datasets logs parse failures itself; we re-raise them as one DataError, so silence the duplicate.
    ds_logger = logging.getLogger("datasets")
    old_level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="moelora-data-") as tmp:
            if _BUILDERS[ext] == "json":
                ds = datasets.Dataset.from_json(path, cache_dir=tmp, keep_in_memory=True)
            else:
                ds = datasets.Dataset.from_parquet(path, cache_dir=tmp, keep_in_memory=True)
            rows = ds.to_list()
    except Exception as exc:  # datasets / pyarrow / json raise many types; report them all the same way
        if "corresponds to no data" in str(exc):  # datasets' wording for a file with zero rows, e.g. "[]"
            raise DataError(f"data file '{path}' is empty (no rows)") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cause = exc.__cause__ or exc.__context__
        if cause is not None and str(cause).strip():
            reason += f" ({str(cause).strip().splitlines()[0]})"
        kind = "JSON" if _BUILDERS[ext] == "json" else "Parquet"
        raise DataError(f"data file '{path}' is not valid {kind}: {reason}") from None
    finally:
        ds_logger.setLevel(old_level)
        if bars_were_on:
            datasets.enable_progress_bars()
    if not rows:
        raise DataError(f"data file '{path}' is empty (no rows)")
    return rows


def _is_blank(path: str) -> bool:
    """True for a zero-byte or whitespace-only file (reads only until the first real byte)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _text(value) -> str | None:
    """Strings pass; ints (e.g. numeric answers parsed from JSON) become strings; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _turns(where: str, turns, field: str, who: str, what: str) -> list[tuple[str, str]]:
    """(speaker, text) of each turn of a row's `field`: a non-empty list of {who: str, what: text} objects."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{field}' must be a non-empty list of {{{who}, {what}}}")
    out = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get(who), str) or _text(t.get(what)) is None:
            raise DataError(f"{where}: {field}[{j}] needs string '{who}' and '{what}'")
        out.append((t[who], _text(t[what])))
    return out


def _sharegpt_messages(where: str, turns) -> list[dict]:
    """ShareGPT ``conversations`` -> OpenAI-style messages (roles mapped by SHAREGPT_ROLES)."""
    msgs = []
    for j, (speaker, text) in enumerate(_turns(where, turns, "conversations", "from", "value")):
        role = SHAREGPT_ROLES.get(speaker.strip().lower())
        if role is None:
            raise DataError(f"{where}: conversations[{j}] has 'from': {short_repr(speaker)}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        msgs.append({"role": role, "content": text})
    return msgs


def _normalise(path, i: int, row: dict, task_field: str, default_task: str = DEFAULT_TASK,
               task_required_by: str | None = None) -> dict:
    where = f"data file '{path}', row index {i}"
    task = row.get(task_field)
    if task is not None and not isinstance(task, str):
        raise DataError(f"{where}: task field '{task_field}' must be a task name (a string), got "
                        f"{type(task).__name__} {short_repr(task)}")
    if task is None or not task.strip():
        if task_required_by:
            raise DataError(f"{where}: missing or empty task field '{task_field}' ({task_required_by}, so "
                            "every row needs one)")
        task = default_task
    task = task.strip()
    template = _template(where, row)
    if row.get("messages") is None and row.get("conversations") is not None:
        row = {**row, "messages": _sharegpt_messages(where, row["conversations"])}
    if row.get("messages") is not None:
        clean = [{"role": role, "content": text}
                 for role, text in _turns(where, row["messages"], "messages", "role", "content")]
        if not any(m["role"] == "assistant" for m in clean):
            raise DataError(f"{where}: 'messages' has no assistant message to learn from")
        last = max(j for j, m in enumerate(clean) if m["role"] == "assistant")
        if last == 0:
            raise DataError(f"{where}: 'messages' has nothing before its assistant message (no user or "
                            "system message to answer)")
        if template is not None:
            raise DataError(f"{where}: template '{PLAIN}' is for instruction rows; a chat ('messages' or "
                            "'conversations') is always rendered with the tokenizer's chat template")
        return {"task": task, "messages": clean}
    for field in ("instruction", "input", "response", "output"):
        value = row.get(field)
        if value is not None and _text(value) is None:  # e.g. a Parquet float column: not "missing"
            raise DataError(f"{where}: '{field}' must be text (or an integer), got {type(value).__name__} "
                            f"{short_repr(value)}")
    instruction = _text(row.get("instruction"))
    if not instruction:
        raise DataError(f"{where}: needs 'instruction' + 'response'/'output', 'messages' or 'conversations'")
    response = _text(row.get("response")) if row.get("response") is not None else _text(row.get("output"))
    if response is None or not response.strip():
        raise DataError(f"{where}: missing or empty 'response' (or 'output')")
    extra = _text(row.get("input"))
    if extra and extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    return {"task": task, "instruction": instruction, "response": response,
            **({"template": template} if template is not None else {})}


def _template(where: str, row: dict) -> str | None:
    """The row's ``template``: absent/null (the tokenizer's chat template) or "plain" (the instruction is the
    prompt as it is, e.g. caption pre-training data); anything else is an error, not a silent chat render."""
    template = row.get("template")
    if template is None:
        return None
    if template != PLAIN:
        raise DataError(f"{where}: 'template' is {short_repr(template)}; the only one known is '{PLAIN}' "
                        "(leave it out for the tokenizer's chat template)")
    return template
