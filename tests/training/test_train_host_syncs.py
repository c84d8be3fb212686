"""train.py's micro-batch loop makes the host wait for nothing: the loss checks and the losses are read once per
optimizer step, with the step's flags (on a GPU each read per micro-batch stopped the host until the queue drained)."""

import sys

from tests.processes import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from host_ops import train_loop_syncs  # noqa: E402


def test_the_loop_reads_only_the_host_batch_per_micro_batch():
    per_step, accum = train_loop_syncs(REPO / "train.py", steps=1, accum=3)
    lines = REPO.joinpath("train.py").read_text().splitlines()
    own = {where: n for where, n in per_step.items() if where.startswith("train.py:")}
    # What is left per micro-batch: its response-token and attention-mask counts, taken on the host batch before
    # it moves to the device (CPU tensors: no GPU wait). The step's one flags read is a tolist, not counted here.
    read = {lines[int(where.split(":")[1]) - 1].strip(): n for where, n in own.items()}
    assert sum(own.values()) == 2 * accum, read
    assert all("batch[" in text and "micro_batches" not in text for text in read), read
    # The token-id check runs once per micro-batch, on the host batch; the forward does not repeat it on the
    # device copy (which on a GPU would wait for the queue).
    model_py = REPO.joinpath("moelora/model.py").read_text().splitlines()
    check = next(i + 1 for i, text in enumerate(model_py) if "if bool((low < 0) | (high >= vocab))" in text)
    assert per_step.get(f"model.py:{check}", 0) == accum, per_step
