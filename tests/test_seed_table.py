"""scripts/seed_table.py: mean ± sd over seeds, paired differences and their verdicts, dead experts from
routing.json — on results folders laid out as scripts/seed_runs.sh writes them."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.processes import REPO

spec = importlib.util.spec_from_file_location("seed_table", REPO / "scripts" / "seed_table.py")
seed_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_table)


def write_run(root: Path, seed: int, name: str, per_task: dict, routing: dict | None = None):
    folder = root / str(seed) / name / "eval" / name
    folder.mkdir(parents=True)
    per_task = {t: v / 100 for t, v in per_task.items()}  # evaluate.py writes fractions
    avg = sum(per_task.values()) / len(per_task)
    (folder / "results.json").write_text(json.dumps({"name": name, "per_task": per_task, "average": avg}))
    if routing is not None:
        (folder / "routing.json").write_text(json.dumps({"expert_names": None, "per_task": routing}))


def test_means_paired_differences_and_verdicts(tmp_path):
    base = {42: 50.0, 43: 60.0, 44: 55.0}
    for seed, v in base.items():
        write_run(tmp_path, seed, "lora-8", {"add": v, "sort": v})
        write_run(tmp_path, seed, "better", {"add": v + 10, "sort": v + 8})  # +9 in every seed
        write_run(tmp_path, seed, "noisy", {"add": v + (5 if seed != 43 else -6), "sort": v})
    runs = seed_table.load_runs(tmp_path)
    assert sorted(runs) == ["better", "lora-8", "noisy"] and sorted(runs["lora-8"]) == [42, 43, 44]
    text = seed_table.tables(runs, "lora-8")
    assert "| lora-8 | 42, 43, 44 | 55.0 ± 5.0 |" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    paired = text.split("## Paired difference")[1].split("## Per task")[0]
    better = next(line for line in paired.splitlines() if line.startswith("| better"))
    noisy = next(line for line in paired.splitlines() if line.startswith("| noisy"))
    assert "| 9.0 ± 0.0 | +9.0, +9.0, +9.0 |" in better and better.rstrip().endswith("| higher |")
    assert noisy.rstrip().endswith("| within spread |")  # one seed disagrees in sign
    assert "add" in rows and "sort" in rows


def test_verdict_needs_mean_above_its_spread_and_two_seeds():
    assert seed_table.verdict([3.0, 4.0, 5.0]) == "higher"
    assert seed_table.verdict([-3.0, -4.0, -5.0]) == "lower"
    assert seed_table.verdict([0.5, 10.0, 0.5]) == "within spread"  # same sign, but sd 5.5 > mean 3.7
    assert seed_table.verdict([2.0]) == "one seed: no claim"


def test_summary_holds_the_tables_numbers(tmp_path):
    for seed, v in {42: 50.0, 43: 60.0, 44: 55.0}.items():
        write_run(tmp_path, seed, "smora", {"add": v, "sort": v + 10}, {"add": {"l0": [1.0, 0.0]}})
    write_run(tmp_path, 42, "solo", {"add": 30.0})
    out = seed_table.summary(seed_table.load_runs(tmp_path))
    assert out["smora"]["seeds"] == [42, 43, 44]
    assert out["smora"]["average"] == {"mean": 60.0, "sd": 5.0, "per_seed": [55.0, 65.0, 60.0]}
    assert out["smora"]["per_task"]["sort"] == {"mean": 65.0, "sd": 5.0}
    assert out["smora"]["dead_per_layer"] == {"mean": 1.0, "sd": 0.0}
    assert out["solo"]["average"]["sd"] is None and out["solo"]["dead_per_layer"] is None  # one seed: no spread
    json.dumps(out)  # JSON as written


def test_dead_experts_are_zero_load_on_every_task():
    routing = {"add": {"l0": [0.5, 0.5, 0.0, 0.0], "l1": [1.0, 0.0, 0.0, 0.0]},
               "sort": {"l0": [0.5, 0.0, 0.5, 0.0], "l1": [0.5, 0.5, 0.0, 0.0]}}
    # l0: only rank 3 never used; l1: ranks 2 and 3 -> mean 1.5 per layer
    rec = seed_table.record({"average": 0.5, "per_task": {"add": 0.5}}, {"per_task": routing})
    assert seed_table.dead_per_layer(rec["load_over_tasks"]) == pytest.approx(1.5)
    assert seed_table.dead_per_layer(None) is None


def test_records_keep_the_tables_after_the_runs_are_gone(tmp_path):
    """runs/ is local to one checkout: --record copies what the tables need into a folder the repository keeps,
    and a table over records + the runs still present counts every seed once."""
    runs_root, records = tmp_path / "runs", tmp_path / "records"
    for seed, v in {42: 50.0, 43: 60.0}.items():
        write_run(runs_root, seed, "smora", {"add": v, "sort": v + 10}, {"add": {"l0": [1.0, 0.0, 0.0]},
                                                                         "sort": {"l0": [0.0, 1.0, 0.0]}})
    before = seed_table.tables(seed_table.load_runs(runs_root), None)
    seed_table.write_records(seed_table.load_runs(runs_root), records)
    assert sorted(p.relative_to(records).as_posix() for p in records.rglob("*.json")) == ["42/smora.json",
                                                                                        "43/smora.json"]
    assert seed_table.tables(seed_table.load_runs(records), None) == before  # the folders are not needed
    write_run(runs_root, 44, "smora", {"add": 55.0, "sort": 65.0})  # a later session adds a seed
    import shutil
    shutil.rmtree(runs_root / "42")
    merged = seed_table.load_runs(records, runs_root)
    assert sorted(merged["smora"]) == [42, 43, 44]
    assert seed_table.summary(merged)["smora"]["dead_per_layer"] == {"mean": 1.0, "sd": 0.0}  # 44 has no routing


def test_empty_root_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["seed_table.py", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        seed_table.main()
    assert exc.value.code == 2
    assert "no <seed>/<name>/eval/<name>/results.json or <seed>/<name>.json" in capsys.readouterr().err


def test_json_replaces_this_tables_methods_and_keeps_the_others(tmp_path):
    out = tmp_path / "seeds.json"
    out.write_text(json.dumps({"lora-64": {"seeds": [42, 43]}, "xlora": {"seeds": [1]}}))
    for seed in (42, 43):
        write_run(tmp_path / "runs", seed, "xlora", {"add": 40.0 + seed})
    seed_table.write_summary(out, seed_table.load_runs(tmp_path / "runs"))
    data = json.loads(out.read_text())
    assert list(data) == ["lora-64", "xlora"] and data["lora-64"] == {"seeds": [42, 43]}
    assert data["xlora"]["seeds"] == [42, 43] and data["xlora"]["average"]["mean"] == 82.5


def test_the_cards_say_which_code_and_section_each_methods_seeds_come_from(tmp_path):
    """seeds.json gathers methods seeded in different sessions, on different code: each entry written with a
    provenance keeps it, an older entry without one stays as it was, and a card quotes its own."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    import release_zoo

    for seed in (42, 43):
        write_run(tmp_path, seed, "lora-16-multimodal", {"add": 50.0 + seed})
    out = tmp_path / "seeds.json"
    out.write_text(json.dumps({"lora-8": {"seeds": [42, 43, 44], "average": {"mean": 44.9, "sd": 0.2, "per_seed": []}}}))
    seed_table.write_summary(out, seed_table.load_runs(tmp_path), {"code": "2026-12-07", "results": "§19"})
    entries = json.loads(out.read_text())
    assert entries["lora-16-multimodal"]["provenance"] == {"code": "2026-12-07", "results": "§19"}
    assert "provenance" not in entries["lora-8"]
    new, old = (release_zoo.spread_sentence(entries[n]) for n in ("lora-16-multimodal", "lora-8"))
    assert "code of 2026-12-07" in new and "RESULTS.md` §19)" in new
    assert "code of 2026-12-02" in old and "RESULTS.md` §9-12)" in old
