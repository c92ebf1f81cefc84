"""DPO at any scale: one global batch of pairs, however it is split, trains the same adapter.

Each micro-batch's loss is its pairs' summed loss over the pair count of the whole step, on all
ranks; with SGD, no dropout and the same pair order, ``1 x 4 pairs``, ``1 x 2 x 2 accumulation
steps`` and ``2 processes x 2`` must save the same adapter, up to float rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_jsonl
from lmtune.cli import main, main_dpo
from test_ddp import adapter, assert_same_adapter, free_port, launch_env  # noqa: F401 (fixture)
from test_dpo import dpo_flags, preference_records



def sgd_flags(model: Path, data: Path, out: Path, *, batch: int, accumulation: int = 1) -> list[str]:
    return dpo_flags(model, data, out, "--max_steps", "2", "--per_device_train_batch_size", str(batch),
                     "--gradient_accumulation_steps", str(accumulation), "--optim", "sgd", "--learning_rate", "2.0",
                     "--train_sampling_strategy", "sequential", "--validation_split_percentage", "0",
                     "--no_cuda", "--beta", "0.5")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    # Uneven lengths, so that a per-micro-batch mean would weigh pairs differently.
    records = preference_records(8, seed=21)
    for i, record in enumerate(records):
        record["chosen"] += " Very good indeed." * (i % 3)
    return write_jsonl(tmp_path_factory.mktemp("dpo-ddp") / "pairs.jsonl", records)


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory, tiny_llama_dir, pairs_file):
    out = tmp_path_factory.mktemp("one-batch")
    assert main_dpo(sgd_flags(tiny_llama_dir, pairs_file, out, batch=4)) == 0
    return adapter(out)


def test_accumulated_pairs_train_the_same_adapter_as_one_batch(one_batch, tiny_llama_dir, pairs_file, tmp_path):
    out = tmp_path / "accumulated"
    assert main_dpo(sgd_flags(tiny_llama_dir, pairs_file, out, batch=2, accumulation=2)) == 0
    assert_same_adapter(out, one_batch)
    half = tmp_path / "half"  # the comparison can fail: half the batch per step trains another adapter
    assert main_dpo(sgd_flags(tiny_llama_dir, pairs_file, half, batch=2)) == 0
    with pytest.raises(AssertionError, match="relative difference"):
        assert_same_adapter(half, one_batch)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_processes_train_the_same_dpo_adapter(one_batch, tiny_llama_dir, pairs_file, tmp_path,
                                                           launch_env, capfd):  # noqa: F811
    out = tmp_path / "ddp"
    code = main(["launch", "--world_size", "2", "--master_port", str(free_port()),
                 "dpo_clm.py",  # the reference's script name, as its gaudi_spawn.py command lines give it
                 *sgd_flags(tiny_llama_dir, pairs_file, out, batch=2), "--ddp_backend", "gloo"])
    output = capfd.readouterr()
    assert code == 0, output.err[-3000:]
    assert_same_adapter(out, one_batch)
    assert (output.out + output.err).count("lmtune: training loss") == 1
