"""Fixture data for the rendering golden test: one case per task, format and model kind.

``tests/golden/render_golden.json`` holds the ``input_ids`` and ``labels`` (and the counts)
that ``prepare_data`` produced for every case before rendering moved onto one
tokenize-and-mask function over ``datasets.map``; ``test_render_golden.py`` asserts that it
still produces exactly them. Regenerate only on purpose: ``python tests/render_cases.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden" / "render_golden.json"

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _instruction_records(demo: list[dict]) -> list[dict]:
    return [dict(r) for r in demo[:24]]


def _mixed_formats() -> dict[str, list[dict]]:
    return {
        "question-answer": [
            {"question": "What is the capital of France?", "response": "Paris."},
            {"question": "Name a color", "response": " red, please"},
            {"question": "Count to three. " * 12, "response": "one two three " * 20},
        ],
        "prompt-completion": [
            {"prompt": "Name a colo", "completion": "r please"},
            {"prompt": "", "completion": "Only a completion, nothing to condition on."},
            {"prompt": "Write a long answer: ", "completion": "word " * 150},
        ],
        "text": [{"text": "A plain text record to learn."}, {"text": "Another one, longer. " * 30}],
        "orca": [
            {"system": "You are terse.", "question": "Why is the sky blue?", "chosen": "Rayleigh scattering."},
            {"system": "", "question": "2+2?", "chosen": "4", "rejected": "5"},
        ],
    }


def _conversations() -> list[dict]:
    long_turn = "Tell me more about it. " * 8
    return [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
                      {"role": "assistant", "content": "Hello! I am fine.\n\nThanks"},
                      {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " It is 4."}]},
        {"messages": [{"role": "user", "content": "Write a poem about the sea."},
                      {"role": "assistant", "content": "The sea is wide, the sea is deep. " * 10}]},
        {"messages": [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "First answer."},
                      {"role": "user", "content": long_turn}, {"role": "assistant", "content": "Second answer."},
                      {"role": "user", "content": "And last?"}, {"role": "assistant", "content": "Last answer here."}]},
        {"messages": [{"role": "user", "content": "A question so long it cannot fit. " * 30},
                      {"role": "assistant", "content": "Unseen."}]},
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Empty system prompt?"},
                      {"role": "assistant", "content": "Then the default one."}]},
    ]


def _sharegpt() -> list[dict]:
    return [{"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
            {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "And bye?"},
                               {"from": "gpt", "value": "Bye."}]}]


def _articles() -> list[dict]:
    return [
        {"article": "The city council met on Monday to discuss the new park. " * 6,
         "highlights": "Council discussed a park.", "id": "a"},
        {"article": "A short note.", "highlights": "A note. " * 40, "id": "b"},
        {"article": "Markets rose sharply after the announcement of lower rates. " * 20,
         "highlights": "Markets rose.\nRates fell.", "id": "c"},
    ]


def cases(demo: list[dict]) -> list[dict]:
    """Every case: records, task, model kind, tokenizer and settings."""
    alpaca = _instruction_records(demo)
    mixed = _mixed_formats()
    out = []

    def add(name, records, task="completion", tokenizer="bpe", seq2seq=False, concat=False, **settings):
        out.append(dict(name=name, records=records, task=task, tokenizer=tokenizer, seq2seq=seq2seq,
                        concat=concat, settings=settings))

    add("completion-alpaca", alpaca)
    add("completion-alpaca-short", alpaca, max_seq_length=150)
    add("completion-alpaca-inputs", alpaca, max_seq_length=110, train_on_inputs=True)
    add("completion-alpaca-packed", alpaca, concat=True, max_seq_length=400)
    add("code-generation-alpaca", alpaca[:8], task="code-generation", max_seq_length=160)
    for fmt, records in mixed.items():
        add(f"completion-{fmt}", records, max_seq_length=64)
    add("chat-neural", _conversations(), task="chat", max_seq_length=300, max_source_length=260)
    add("chat-neural-long", _conversations(), task="chat")
    add("chat-neural-inputs", _conversations(), task="chat", max_seq_length=300, max_source_length=260,
        train_on_inputs=True)
    add("chat-template", _conversations(), task="chat", max_seq_length=160, max_source_length=120,
        chat_template="tokenizer")
    add("chat-sharegpt", _sharegpt(), task="chat")
    add("chat-orca", mixed["orca"], task="chat")
    add("summarization", _articles(), task="summarization", max_seq_length=96, max_source_length=64)
    add("summarization-inputs", _articles(), task="summarization", max_seq_length=128, max_source_length=100,
        train_on_inputs=True)
    add("seq2seq-alpaca", alpaca, tokenizer="t5", seq2seq=True, max_source_length=140, max_target_length=8)
    add("seq2seq-formats", mixed["question-answer"] , tokenizer="t5", seq2seq=True, max_source_length=40,
        max_target_length=16)
    add("seq2seq-chat", _conversations(), task="chat", tokenizer="t5", seq2seq=True, max_source_length=240,
        max_target_length=20)
    add("seq2seq-summarization", _articles(), task="summarization", tokenizer="t5", seq2seq=True,
        max_source_length=48, max_target_length=12)
    return out


def tokenizers() -> dict:
    sys.path.insert(0, str(TESTS))
    from tiny_t5 import build_t5_tokenizer

    from lmtune.demo import build_demo_tokenizer, load_demo_records

    demo = load_demo_records()
    bpe = build_demo_tokenizer([r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in demo],
                               vocab_size=512)
    bpe.chat_template = CHATML
    return {"bpe": bpe, "t5": build_t5_tokenizer()}


def run_case(case: dict, tokenizer, work_dir: Path, **prepare_kwargs) -> dict:
    """``prepare_data`` on one case; the rows and the counts that rendering reports."""
    from lmtune.data.prepare import RenderSettings, prepare_data

    path = work_dir / f"{case['name']}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in case["records"]), encoding="utf-8")
    prepared = prepare_data(tokenizer, task=case["task"], train_file=str(path), seq2seq=case["seq2seq"],
                            dataset_concatenation=case["concat"], settings=RenderSettings(**case["settings"]),
                            **prepare_kwargs)
    stats = prepared.stats["train"]
    result = {"input_ids": list(prepared.train["input_ids"]), "labels": list(prepared.train["labels"]),
              "counts": [stats.kept, stats.dropped_long_prompt, stats.truncated, stats.tokens,
                         stats.supervised_tokens]}
    if "position_ids" in prepared.train.column_names:
        result["position_ids"] = list(prepared.train["position_ids"])
    return result


def main() -> None:
    import tempfile

    from lmtune.demo import load_demo_records

    toks = tokenizers()
    golden = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(load_demo_records()):
            golden[case["name"]] = run_case(case, toks[case["tokenizer"]], Path(tmp))
            print(case["name"], golden[case["name"]]["counts"])
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, separators=(",", ":")) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
