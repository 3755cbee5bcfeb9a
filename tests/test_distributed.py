"""Two processes on this machine's CPU (gloo), launched by torchrun on 127.0.0.1:
DDP, FSDP2 and the all-reduce of StreamingSpectrum and StreamingRegression against one
process on all the data.

One torchrun launch runs every scenario (``dist_worker.py``); each test checks one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "--max_restarts=0",
        str(TESTS / "dist_worker.py"),
        str(out),
    ]
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=TESTS)
    assert proc.returncode == 0, f"torchrun failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(r["world"] == WORLD for r in results)
    return results


def test_ddp_gives_every_rank_the_gradients_of_one_process_on_the_whole_batch(ranks):
    first = ranks[0]["ddp"]["grads"]
    assert first and all(g.abs().max() > 0 for g in first.values())
    assert any(".cera_A." in k for k in first) and any(".cera_B." in k for k in first)
    for rank in ranks:
        grads, reference = rank["ddp"]["grads"], rank["ddp"]["reference"]
        assert grads.keys() == reference.keys()
        for key in grads:
            torch.testing.assert_close(grads[key], reference[key], rtol=1e-5, atol=1e-8)
            assert torch.equal(grads[key], first[key]), f"ranks disagree on {key}"


def test_fsdp2_training_loss_matches_one_process(ranks):
    for rank in ranks:
        run = rank["fsdp"]
        assert run["sharded_params"] > 0
        assert run["losses"][-1] < run["losses"][0]
        torch.testing.assert_close(
            torch.tensor(run["losses"]), torch.tensor(run["reference_losses"]), rtol=1e-5, atol=0
        )
        assert run["weights"].keys() == run["reference_weights"].keys()
        for key, weight in run["weights"].items():
            torch.testing.assert_close(weight, run["reference_weights"][key], rtol=1e-4, atol=1e-6)
    assert ranks[0]["fsdp"]["losses"] == ranks[1]["fsdp"]["losses"]


def test_streaming_spectrum_states_merge_across_ranks_with_all_reduce(ranks):
    for rank in ranks:
        run = rank["spectral"]
        assert run["tokens_seen"] == run["reference_tokens"] == 30 + 37
        torch.testing.assert_close(run["values"], run["reference_values"], rtol=1e-10, atol=1e-12)


def test_streaming_regression_states_merge_across_ranks_with_all_reduce(ranks):
    for rank in ranks:
        run = rank["regression"]
        assert run["tokens_seen"] == run["reference_tokens"] == 30 + 37
        assert 0.5 < run["linearity"][-1] < 1  # silu of 3 features is not linear
        torch.testing.assert_close(run["linearity"], run["reference_linearity"], rtol=0, atol=1e-12)
