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


def test_missing_task_field_names_file_and_first_bad_row(tmp_path):
    rows = [ROWS[0], ROWS[0], {"instruction": "x", "response": "y"}, {"instruction": "z", "response": "w"}]
    path = _jsonl(tmp_path / "notask.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_user_data([path])
    assert "notask.jsonl" in str(err.value) and "row index 2" in str(err.value) and "'task'" in str(err.value)


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
