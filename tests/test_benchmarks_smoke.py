"""The benchmark scripts still run (tiny model, one step) and compare each case with the right peer.
Timings here mean nothing; benchmarks/RESULTS.md holds the real runs."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.slow
def test_train_step_benchmark_pairs_every_case_with_its_peer(tmp_path):
    import bench_train_step

    out = tmp_path / "train.json"
    bench_train_step.main(["--base", "tiny-random-llama", "--cases", "lora8", "smora64_8", "xlora", "modality",
                           "--steps", "1", "--warmup", "0", "--seq", "16", "--no-memory", "--json", str(out),
                           "--workdir", str(tmp_path / "experts")])
    cases = json.loads(out.read_text())["cases"]
    assert {n: c["peer"] for n, c in cases.items() if c["peer"]} == {
        "lora8": "peft_lora8", "smora64_8": "peft_lora64", "xlora": "peft_xlora", "modality": "peft_lora16"}
    assert cases["lora8"]["trainable"] == cases["peft_lora8"]["trainable"]  # the same LoRA, two libraries
    assert cases["xlora"]["trainable"] == cases["peft_xlora"]["trainable"]  # the same classifier
    assert all(c["time_ratio"] > 0 for c in cases.values() if c["peer"])


@pytest.mark.slow
def test_generate_benchmark_xlora_matches_peft_tokens(tmp_path):
    import bench_generate

    out = tmp_path / "gen.json"
    bench_generate.main(["--base", "tiny-random-llama", "--cases", "xlora", "--new-tokens", "4", "--runs", "1",
                         "--json", str(out), "--workdir", str(tmp_path / "experts")])
    cases = json.loads(out.read_text())["cases"]
    assert cases["xlora"]["identical_tokens_to_peer"] is True
    assert cases["xlora"]["speed_vs_peer"] > 0
