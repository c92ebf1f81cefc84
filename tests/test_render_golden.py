"""Every task's token ids and labels are exactly what they were before rendering was unified.

``golden/render_golden.json`` was written by ``render_cases.py`` from the four renderers that
each had their own loop (completion/code, chat, summarization, seq2seq); rendering now runs
through one tokenize-and-mask function, and must not have changed a single id or label.
"""

from __future__ import annotations

import json

import pytest
from render_cases import GOLDEN, cases, run_case, tokenizers

from lmtune.demo import load_demo_records

CASES = cases(load_demo_records())


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def case_tokenizers() -> dict:
    return tokenizers()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_rendering_matches_golden(case, golden, case_tokenizers, tmp_path):
    expected = golden[case["name"]]
    got = run_case(case, case_tokenizers[case["tokenizer"]], tmp_path)
    assert got["counts"] == expected["counts"]
    assert got["input_ids"] == expected["input_ids"]
    assert got["labels"] == expected["labels"]
    assert got.get("position_ids") == expected.get("position_ids")


@pytest.mark.parametrize("name", ["chat-template", "summarization", "seq2seq-chat"])
def test_two_workers_render_the_golden_samples(name, golden, case_tokenizers, tmp_path):
    """Each format's segment function pickles to datasets.map's worker processes and renders alike there."""
    case = next(c for c in CASES if c["name"] == name)
    got = run_case(case, case_tokenizers[case["tokenizer"]], tmp_path, preprocessing_num_workers=2,
                   keep_in_memory=True)
    assert (got["input_ids"], got["labels"], got["counts"]) == (golden[name]["input_ids"], golden[name]["labels"],
                                                                golden[name]["counts"])


def test_golden_covers_every_task_and_model_kind():
    seen = {(c["task"], c["seq2seq"]) for c in CASES}
    for task in ("completion", "code-generation", "chat", "summarization"):
        assert (task, False) in seen
    for task in ("completion", "chat", "summarization"):
        assert (task, True) in seen
