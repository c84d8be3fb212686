"""The benchmark scripts still run (tiny model, one step) and compare each case with the right peer.
Timings here mean nothing; benchmarks/RESULTS.md holds the real runs."""

import json
import sys

import pytest

from tests.processes import REPO

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
def test_train_step_benchmark_on_instruction_batches(tmp_path):
    """--batches instruction: every case trains on the same suite-shaped batch (response-only labels); ours with
    the LM head at supervised positions, PEFT with full logits."""
    import bench_train_step
    import cases

    out = tmp_path / "train.json"
    bench_train_step.main(["--base", "tiny-random-llama", "--cases", "lora8", "--batches", "instruction",
                           "--steps", "1", "--warmup", "0", "--no-memory", "--json", str(out)])
    got = json.loads(out.read_text())
    assert set(got["cases"]) == {"lora8", "peft_lora8"} and got["cases"]["lora8"]["time_ratio"] > 0
    assert "built-in-suite examples" in got["header"]
    gen = __import__("torch").Generator().manual_seed(0)
    batch = cases.make_instruction_batch("lora8", 259, 4, gen)  # no SmolLM2 vocabulary: the suite's statistics
    supervised = (batch["labels"] != -100).float().mean()
    assert batch["input_ids"].shape == (4, cases.SUITE_MEAN_LENGTH)
    assert abs(float(supervised) - cases.SUITE_SUPERVISED_FRACTION) < 0.02


@pytest.mark.slow
def test_generate_benchmark_xlora_matches_peft_tokens(tmp_path):
    import bench_generate

    out = tmp_path / "gen.json"
    bench_generate.main(["--base", "tiny-random-llama", "--cases", "xlora", "--new-tokens", "4", "--runs", "1",
                         "--json", str(out), "--workdir", str(tmp_path / "experts")])
    cases = json.loads(out.read_text())["cases"]
    assert cases["xlora"]["identical_tokens_to_peer"] is True
    assert cases["xlora"]["speed_vs_peer"] > 0


@pytest.mark.slow
def test_train_step_benchmark_times_each_backend_in_bf16(tmp_path):
    """--backends gives one row per op backend (the same model and peer), --dtype moves everything to bf16."""
    import bench_train_step

    out = tmp_path / "train.json"
    bench_train_step.main(["--base", "tiny-random-llama", "--cases", "mixlora", "--backends", "torch",
                           "--dtype", "bf16", "--steps", "1", "--warmup", "0", "--seq", "16", "--no-memory",
                           "--json", str(out)])
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {"mixlora@torch", "peft_lora16"}
    assert cases["mixlora@torch"]["peer"] == "peft_lora16" and cases["mixlora@torch"]["time_ratio"] > 0


def test_random_smollm2_base_has_the_real_shape():
    """GPU runs use SmolLM2-135M's architecture with random weights: same parameter count as the real model."""
    import cases

    with __import__("torch").device("meta"):
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**cases.SMOLLM2_SHAPE))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_random_llama3_8b_shape_has_llama3_8b_widths():
    """The 8B-shaped base: at Llama-3-8B's 32 layers it would have Llama-3-8B's 8,030,261,248 parameters."""
    import cases

    from transformers import LlamaConfig, LlamaForCausalLM

    with __import__("torch").device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{**cases.LLAMA3_8B_SHAPE, "num_hidden_layers": 32}))
        small = cases.load_base(cases.RANDOM_LLAMA3_8B, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert small.config.num_hidden_layers == 4 and small.lm_head.weight.device.type == "meta"


@pytest.mark.parametrize("script", ["bench_kernel.py", "tune_kernel_tiles.py", "profile_kernel.py"])
def test_gpu_scripts_exit_with_a_message_without_a_gpu(script):
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the scripts would run")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr


@pytest.mark.integration
def test_random_smollm2_shape_matches_the_packaged_config():
    import cases

    from moelora.base_models import resolve_base_model

    real = resolve_base_model("smollm2-135m-instruct")[0].config
    for key, value in cases.SMOLLM2_SHAPE.items():
        assert getattr(real, key) == (pytest.approx(value) if isinstance(value, float) else value), key


def _gpu_check(*args, timeout=60):
    import subprocess

    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_arguments():
    """The prepared GPU script: stage list, and one clear line with exit code 2 for bad arguments."""
    listed = _gpu_check("--list")
    assert listed.returncode == 0 and listed.stdout.split()[:3] == ["checks_op", "checks_compile", "checks_methods"]
    for bad, message in ((["--bogus"], "unknown argument '--bogus'"), (["--only", "nope"], "unknown stage 'nope'"),
                         (["--budget", "soon"], "--budget needs whole seconds"), (["--out"], "--out needs a folder")):
        proc = _gpu_check(*bad)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, bad


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_stage(tmp_path):
    """--cpu-smoke: every stage at tiny shapes on CPU (kernels under the interpreter), each timed in the summary;
    the compiled train steps run if bench_train_step.py has --compile, and say why not otherwise."""
    import subprocess

    out = tmp_path / "gpu"
    proc = _gpu_check("--cpu-smoke", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = {line.split()[0]: line.split(None, 3)[1:] for line in (out / "summary.txt").read_text().splitlines()
            if not line.startswith("total")}
    stages = _gpu_check("--list").stdout.split()
    assert list(rows) == stages
    has_compile = "--compile" in subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"),
                                                 "--help"], capture_output=True, text=True).stdout
    skipped = {"profile", "train_xlora_eager"} | (set() if has_compile else {"train_smollm2_compiled",
                                                                          "train_8b_compiled"})
    for stage, (status, seconds, *note) in rows.items():
        assert status == ("SKIP" if stage in skipped else "ok"), (stage, status, note)
        assert seconds.endswith("s") and (status == "ok" or note), stage
    kernel = json.loads((out / "kernel.json").read_text())["results"][0]
    assert kernel["pattern"] == "mixlora_pool64_r8_sep" and "roofline_fraction_fwdbwd" in kernel
    train = json.loads((out / "train_smollm2_eager.json").read_text())["cases"]
    assert train["smora64_8@triton"]["peer"] == "peft_lora64" and train["smora64_8@triton"]["time_ratio"] > 0
    assert "all checks passed" in (out / "checks_compile.txt").read_text()


@pytest.mark.slow
def test_count_launches_per_layer_call():
    """benchmarks/count_launches.py under the interpreter: SMoRA's layer call (h given) is 2 Triton launches
    forward and 3 backward (dH_g with the routing's backward in its epilogue, dB, the dB partial sum), no torch
    kernels (before: 2 + 1 forward, 3 + 3 backward)."""
    import subprocess

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "count_launches.py"), "--layers",
                           "smora (R=64, k=8, h given)", "--regimes", "short", "--json"], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)
    assert row["fwd_triton"] == {"_matmul_kernel": 1, "_routing_kernel": 1} and row["fwd_torch"] == {}
    assert row["bwd_triton"] == {"_grad_hg_kernel": 1, "_matmul_kernel": 1, "_sum_slices_kernel": 1}
    assert row["bwd_torch"] == {}
