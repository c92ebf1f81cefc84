"""Conversation records under the default --task completion are trained as --task chat, with a notice."""

from __future__ import annotations

import json
import logging

import pytest

from lmtune.data.prepare import prepare_data
from lmtune.errors import DataFormatError
from lmtune.finetuning import finetune

from conftest import write_jsonl

MESSAGES = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
SHAREGPT = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]


@pytest.mark.parametrize("field, turns", [("messages", MESSAGES), ("conversations", SHAREGPT)])
def test_conversations_pick_the_chat_task(tokenizer, tmp_path, caplog, field, turns):
    path = write_jsonl(tmp_path / "chat.jsonl", [{field: turns}] * 6)
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        prepared = prepare_data(tokenizer, train_file=str(path))
    assert prepared.task == "chat" and len(prepared.train) == 6
    assert [r.getMessage() for r in caplog.records if "--task chat" in r.getMessage()] == [
        f"the records hold conversations (a '{field}' field): training them as --task chat; pass --task chat to "
        "say so."]


def test_instruction_records_and_other_tasks_are_left_alone(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [{"instruction": "q", "output": "a", "messages": MESSAGES}] * 4)
    assert prepare_data(tokenizer, train_file=str(path)).task == "completion"
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES}] * 4)
    with pytest.raises(DataFormatError, match=r"which match no known format\..*The 'messages' field holds "
                                              r"conversations: pass --task chat\."):
        prepare_data(tokenizer, task="code-generation", train_file=str(path))


def test_the_run_records_the_chat_task(tiny_llama_dir, tmp_path):
    """lmtune chat reads the task back from lmtune_args.json to choose its prompt format."""
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES}] * 8)
    finetune(model_name_or_path=str(tiny_llama_dir), train_file=str(path), output_dir=str(tmp_path / "out"),
             do_train=True, max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)
    saved = json.loads((tmp_path / "out" / "lmtune_args.json").read_text(encoding="utf-8"))
    assert saved["args"]["finetune"]["task"] == "chat"
