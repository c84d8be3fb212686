"""Where the repository is, and starting scripts in several CPU processes for the distributed tests: `accelerate
launch` and torchrun over gloo.

One place for the command lines, so every launching test runs its processes the same way (free port, no mixed
precision, no dynamo, one machine) and a script started this way can import `tests.*`; and one REPO for every test
that reads the repository's scripts, configs or cards.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port nothing listens on now: parallel launches must not share a rendezvous port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(processes: int, *script_and_args, deepspeed_json: str | None = None) -> list[str]:
    """The `accelerate launch` command running `script_and_args` in `processes` CPU processes (under DeepSpeed
    with the given JSON)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    if deepspeed_json is not None:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", deepspeed_json]
    elif processes > 1:
        cmd.append("--multi_gpu")  # with Accelerator(cpu=True) in the scripts: CPU processes over gloo
    return [*cmd, *map(str, script_and_args)]


def torchrun(processes: int, *script_and_args) -> list[str]:
    """The torchrun command running `script_and_args` in `processes` processes (for what accelerate does only on
    accelerators, such as FSDP)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port()), *map(str, script_and_args)]


def run(cmd: list[str], *, timeout: int = 600, check: bool = True,
        one_thread: bool = True) -> subprocess.CompletedProcess:
    """Runs a launch command from the repository root; with `check`, a failure shows the end of its stderr.

    `one_thread`: each process uses one thread, so two processes share the 2-core CI machine instead of fighting
    over it (tests that compare against an in-process run with its default threads turn it off)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # launched scripts import tests.*
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
