"""User data files: JSONL/JSON/Parquet round trips and file-naming errors for bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moelora.data.formatting import encode_example
from moelora.base_models import build_tiny_tokenizer
from moelora.data.user_data import load_user_data
from moelora.errors import DataError

ROWS = [
    {"task": "qa", "instruction": "Capital of France?", "response": "Paris"},
    {"task": "qa", "instruction": "Add", "input": "2 and 3", "output": "5"},
]
CHAT = {
    "task": "chat",
    "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
}
EXPECTED = [
    {"task": "qa", "instruction": "Capital of France?", "response": "Paris"},
    {"task": "qa", "instruction": "Add\n\n2 and 3", "response": "5"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_and_json_round_trip(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ROWS)
    b = tmp_path / "b.json"
    b.write_text(json.dumps([CHAT]))
    rows = load_user_data([a, str(b)])
    assert rows == EXPECTED + [CHAT]
    tok = build_tiny_tokenizer()
    assert encode_example(tok, rows[-1], 64)["task"] == "chat"


def test_parquet_round_trip_and_custom_task_field(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist([{"skill": "qa", "instruction": "Capital of France?", "response": "Paris"}])
    pq.write_table(table, path)
    assert load_user_data([str(path)], task_field="skill") == [EXPECTED[0]]
    chat_path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT]), chat_path)
    assert load_user_data(str(chat_path)) == [CHAT]


def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_user_data([str(tmp_path / "nope.jsonl")])


@pytest.mark.parametrize("content", ["", "\n  \n", "[]"])
def test_empty_file_names_path(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(DataError, match="empty.json' is empty"):
        load_user_data([str(path)])


def test_corrupt_json_names_path(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"task": "a", "instruction": "x", "response": "y"}\n{"task": "a", oops\n')
    with pytest.raises(DataError, match="broken.jsonl' is not valid JSON"):
        load_user_data([str(path)])


def test_corrupt_parquet_names_path(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="broken.parquet' is not valid Parquet"):
        load_user_data([str(path)])


def test_rows_without_task_get_the_default_task(tmp_path):
    rows = [ROWS[0], {"instruction": "x", "response": "y"}, {"task": "  ", "instruction": "z", "output": "w"}]
    path = _jsonl(tmp_path / "notask.jsonl", rows)
    assert [r["task"] for r in load_user_data([path])] == ["qa", "default", "default"]
    assert [r["task"] for r in load_user_data([path], default_task="mine")] == ["qa", "mine", "mine"]


def test_missing_task_when_required_names_file_and_first_bad_row(tmp_path):
    rows = [ROWS[0], ROWS[0], {"instruction": "x", "response": "y"}, {"instruction": "z", "response": "w"}]
    path = _jsonl(tmp_path / "notask.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_user_data([path], task_required_by="method lora_mixer routes each row by its task")
    msg = str(err.value)
    assert "notask.jsonl" in msg and "row index 2" in msg and "'task'" in msg and "lora_mixer" in msg


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "user", "value": "2+2?"},
        {"from": "assistant", "value": 4},
    ]
}


def test_sharegpt_rows_become_chat_messages(tmp_path):
    path = _jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT, {"task": "chat", **SHAREGPT}, CHAT, ROWS[0]])
    rows = load_user_data([path])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    assert rows == [{"task": "default", "messages": messages}, {"task": "chat", "messages": messages},
                    CHAT, EXPECTED[0]]
    tok = build_tiny_tokenizer()
    enc = encode_example(tok, rows[0], 128)
    assert tok.decode([t for t in enc["labels"] if t != -100]) == "Hello<|im_end|>4<|im_end|>"
    as_text = {"conversations": [{**t, "value": str(t["value"])} for t in SHAREGPT["conversations"]]}
    pq.write_table(pa.Table.from_pylist([as_text]), tmp_path / "sharegpt.parquet")
    assert load_user_data(str(tmp_path / "sharegpt.parquet")) == rows[:1]


@pytest.mark.parametrize("turns, match", [
    ([{"from": "robot", "value": "x"}], r"conversations\[0\] has 'from': 'robot'"),
    ([{"from": "human"}], r"conversations\[0\] needs string 'from' and 'value'"),
    ([], "'conversations' must be a non-empty list"),
    ([{"from": "human", "value": "q"}], "no assistant"),
])
def test_bad_sharegpt_rows_name_file_and_row(tmp_path, turns, match):
    path = _jsonl(tmp_path / "bad.jsonl", [SHAREGPT, {"conversations": turns}])
    with pytest.raises(DataError, match=r"bad.jsonl', row index 1: .*" + match):
        load_user_data([path])


def test_row_without_response_or_assistant(tmp_path):
    path = _jsonl(tmp_path / "noresp.jsonl", [{"task": "a", "instruction": "x"}])
    with pytest.raises(DataError, match=r"noresp.jsonl', row index 0: .*response"):
        load_user_data([path])
    chat = {"task": "c", "messages": [{"role": "user", "content": "q"}]}
    path = _jsonl(tmp_path / "noasst.jsonl", [chat])
    with pytest.raises(DataError, match=r"noasst.jsonl', row index 0: .*assistant"):
        load_user_data([path])


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("task,instruction,response\n")
    with pytest.raises(DataError, match="data.csv"):
        load_user_data([str(path)])


def test_plain_template_rows_keep_their_template_and_render_without_the_chat_template(tmp_path):
    from moelora.data.formatting import split_prompt_response

    plain = {"task": "caption", "instruction": "A photo of", "response": " a cat", "template": "plain"}
    path = _jsonl(tmp_path / "p.jsonl", [plain, ROWS[0]])
    rows = load_user_data(path)
    assert rows == [plain, EXPECTED[0]]  # the chat row has no template key at all
    tok = build_tiny_tokenizer()
    assert split_prompt_response(tok, rows[0]) == ("A photo of", " a cat")
    assert split_prompt_response(tok, rows[1])[0] != "Capital of France?"  # chat-rendered
    parquet = tmp_path / "p.parquet"  # a column present in some rows only reads back as null elsewhere
    pq.write_table(pa.Table.from_pylist([plain, {**ROWS[0], "template": None}]), parquet)
    assert load_user_data(str(parquet)) == [plain, EXPECTED[0]]


@pytest.mark.parametrize("row, match", [
    ({"instruction": "x", "response": "y", "template": "chatml"}, r"row index 0: 'template' is 'chatml'"),
    ({**CHAT, "template": "plain"}, r"row index 0: template 'plain' is for instruction rows"),
])
def test_bad_template_names_file_row_and_value(tmp_path, row, match):
    with pytest.raises(DataError, match=match):
        load_user_data(_jsonl(tmp_path / "t.jsonl", [row]))
