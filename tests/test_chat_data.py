"""Chat data: schemas, validation, the NeuralChat format token for token, templates, truncation, real data."""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil

import datasets
import pytest
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from conftest import write_jsonl
from lmtune.data.chat import (
    SLIMORCA_SYSTEM_PROMPT,
    conversation_from_record,
    render_chat_records,
    render_prompt,
)
from lmtune.data.chat_format import NEURAL_CHAT_SYSTEM_PROMPT, ChatFormat, resolve_chat_format
from lmtune.data.formats import to_examples
from lmtune.data.prepare import RenderSettings, prepare_data
from lmtune.data.render import IGNORE_INDEX
from lmtune.data.sources import load_splits
from lmtune.errors import ConfigError, DataFormatError

SYSTEM, U1, A1 = "Be brief.", "Hi there, how are you?", "Hello! I am fine.\n\nThanks"
U2, A2 = "What is 2+2?", " It is 4."
CONVERSATION = [
    {"role": "system", "content": SYSTEM}, {"role": "user", "content": U1}, {"role": "assistant", "content": A1},
    {"role": "user", "content": U2}, {"role": "assistant", "content": A2},
]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def neural_chat_text(eos: str, system: str = SYSTEM) -> str:
    return (f"### System:\n{system}{eos}\n### User:\n{U1}{eos}\n### Assistant:\n{A1}{eos}\n"
            f"### User:\n{U2}{eos}\n### Assistant:\n{A2}{eos}")


def render_one(tokenizer, messages, **kwargs):
    samples, stats = render_chat_records([{"messages": messages}], ["messages"], tokenizer, source="t.jsonl",
                                         **{"max_seq_length": 2048, "max_source_length": 2048, **kwargs})
    return samples["input_ids"][0], samples["labels"][0], stats


def supervised_spans(tokenizer, ids, labels) -> list[str]:
    """Decode each run of supervised tokens."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return [tokenizer.decode(span) for span in spans + ([current] if current else [])]


def test_neural_chat_format_token_for_token(tokenizer):
    ids, labels, stats = render_one(tokenizer, CONVERSATION)
    assert ids == tokenizer(neural_chat_text("</s>")).input_ids  # BOS + the whole text tokenized at once
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.eos_token_id) == 5  # one per turn: system, 2 user, 2 assistant
    assert ids[-1] == tokenizer.eos_token_id and ids[-2] != tokenizer.eos_token_id
    assert supervised_spans(tokenizer, ids, labels) == [A1 + "</s>", A2 + "</s>"]
    assert stats.kept == 1 and stats.supervised_tokens == sum(label != IGNORE_INDEX for label in labels)


def test_default_system_prompt_has_no_indentation(tokenizer):
    ids, _, _ = render_one(tokenizer, CONVERSATION[1:])
    assert tokenizer.decode(ids) == "<s>" + neural_chat_text("</s>", system=NEURAL_CHAT_SYSTEM_PROMPT)
    assert NEURAL_CHAT_SYSTEM_PROMPT.startswith("- You are a helpful assistant chatbot trained by Intel.\n- You answer")
    assert "    " not in NEURAL_CHAT_SYSTEM_PROMPT


def test_eos_with_regex_metacharacters(tokenizer):
    odd = copy.deepcopy(tokenizer)
    odd.add_special_tokens({"eos_token": "<|end.of*text|>"})
    ids, labels, _ = render_one(odd, CONVERSATION)
    assert ids == odd(neural_chat_text("<|end.of*text|>")).input_ids
    assert ids.count(odd.eos_token_id) == 5
    assert supervised_spans(odd, ids, labels) == [A1 + "<|end.of*text|>", A2 + "<|end.of*text|>"]


def test_real_tokenizers_match_whole_text(shared_data, tmp_path):
    """GPT-NeoX (<|endoftext|>, no BOS) and a SentencePiece LLaMA tokenizer: no stray pieces."""
    neox = PreTrainedTokenizerFast(tokenizer_file=str(shared_data / "tokenizers/gpt-neox-20B_tokenizer.json"),
                                   eos_token="<|endoftext|>")
    shutil.copy(shared_data / "tokenizers/llama2c_tokenizer.model", tmp_path / "tokenizer.model")
    sentencepiece = LlamaTokenizer.from_pretrained(tmp_path)
    for tok in (neox, sentencepiece):
        ids, labels, _ = render_one(tok, CONVERSATION)
        assert ids == tok(neural_chat_text(tok.eos_token)).input_ids
        assert tok.convert_ids_to_tokens(ids[-1]) == tok.eos_token and ids.count(tok.eos_token_id) == 5
        # SentencePiece drops a leading space when decoding a span alone; the ids above are exact.
        spans = [span.lstrip() for span in supervised_spans(tok, ids, labels)]
        assert spans == [A1 + tok.eos_token, A2.lstrip() + tok.eos_token]


def test_train_on_inputs_supervises_everything_but_the_first_token(tokenizer):
    ids, labels, _ = render_one(tokenizer, CONVERSATION, train_on_inputs=True)
    assert labels == [IGNORE_INDEX] + ids[1:]


def test_sharegpt_conversations_and_slimorca_default_system(tokenizer):
    turns = [{"from": "human", "value": "Q?", "weight": None}, {"from": "gpt", "value": "A.", "weight": 1.0}]
    empty_system = [{"from": "system", "value": ""}] + turns
    given_system = [{"from": "system", "value": "Be kind."}] + turns
    read = [conversation_from_record({"conversations": c}, "conversations", "s: record 0")
            for c in (turns, empty_system, given_system)]
    expected = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert read[0] == read[1] == [{"role": "system", "content": SLIMORCA_SYSTEM_PROMPT}] + expected
    assert read[2] == [{"role": "system", "content": "Be kind."}] + expected
    samples, _ = render_chat_records([{"conversations": turns}], ["conversations"], tokenizer, source="s")
    assert tokenizer.decode(samples["input_ids"][0]) == (
        f"<s>### System:\n{SLIMORCA_SYSTEM_PROMPT}</s>\n### User:\nQ?</s>\n### Assistant:\nA.</s>")
    with pytest.raises(DataFormatError, match=r"s: record 0: message 1: speaker 'bot' is not allowed; "
                                              r"allowed: system, human, gpt"):
        render_chat_records([{"conversations": [turns[0], {"from": "bot", "value": "x"}]}], ["conversations"],
                            tokenizer, source="s")


def test_orca_dpo_pairs_as_chat_and_as_completion(tokenizer):
    records = [{"system": "", "question": "Q?", "chosen": "Good.", "rejected": "Bad."},
               {"system": "You are an AI.", "question": "Q?", "chosen": "Good.", "rejected": "Bad."}]
    columns = ["system", "question", "chosen", "rejected"]
    samples, _ = render_chat_records(records, columns, tokenizer, source="dpo")
    texts = [tokenizer.decode(ids) for ids in samples["input_ids"]]
    assert texts[0] == f"<s>### System:\n{NEURAL_CHAT_SYSTEM_PROMPT}</s>\n### User:\nQ?</s>\n### Assistant:\nGood.</s>"
    assert texts[1] == "<s>### System:\nYou are an AI.</s>\n### User:\nQ?</s>\n### Assistant:\nGood.</s>"
    examples = to_examples(records, columns, "dpo")  # --task completion: Alpaca-style template
    assert examples[0]["prompt"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nQ?\n\n### Response:\n")
    assert examples[1] == {"prompt": "You are an AI.\n\n### Instruction:\nQ?\n\n### Response:\n", "response": "Good."}


def test_bad_chat_files_name_file_record_and_message(tokenizer, shared_data):
    bad = shared_data / "files/bad"
    with pytest.raises(DataFormatError, match=r"chat_unknown_role\.jsonl: record 5 \(line 6\): message 2: role "
                                              r"'narrator' is not allowed; allowed: system, user, assistant\. Fix: "
                                              r"correct the record, or pass --skip_invalid_records"):
        prepare_data(tokenizer, task="chat", train_file=str(bad / "chat_unknown_role.jsonl"))
    with pytest.raises(DataFormatError, match=r"chat_roles_not_alternating\.jsonl: record 4 \(line 5\): message 1: "
                                              r"expected role 'assistant' but found 'user'.*"
                                              r"\(roles: user, user, assistant\)"):
        prepare_data(tokenizer, task="chat", train_file=str(bad / "chat_roles_not_alternating.jsonl"))


@pytest.mark.parametrize("messages, error", [
    ([], r"record 0: the conversation is empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
     r"record 0: message 2: a system message must come first"),
    ([{"role": "assistant", "content": "b"}], r"record 0: message 0: expected role 'user' but found 'assistant'"),
    ([{"role": "user", "content": "a"}],
     r"record 0: message 0: the conversation must end with an assistant answer to learn from \(roles: user\)"),
    ([{"role": "system", "content": "s"}], r"record 0: the conversation has a system message but no user/assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}],
     r"record 0: message 1: the assistant message is empty"),
    ([{"role": "user", "content": 3}], r"record 0: message 0: field 'content' is a number \(3\); expected a string\. "),
    (["hi"], r"record 0: message 0 is a string \(\"hi\"\); expected an object with 'role'\. "),
    ("hi", r"record 0: field 'messages' is a string \(\"hi\"\); expected a list of \{role, content\}\. "),
])
def test_conversation_errors(tokenizer, messages, error):
    with pytest.raises(DataFormatError, match="t.jsonl: " + error):
        render_one(tokenizer, messages)


def test_unknown_schema_and_skip_invalid(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b"}])
    expected = (
        f"{path}: the records have fields ['instruction', 'output'], which match no chat schema. Accepted: "
        "messages (a list of {role, content}), conversations (a list of {from, value}, ShareGPT/SlimOrca), "
        "system + question + chosen (Intel/orca_dpo_pairs). For instruction records use --task completion."
    )
    with pytest.raises(DataFormatError, match="^" + re.escape(expected) + "$"):  # no internal _lmtune_ columns
        prepare_data(tokenizer, task="chat", train_file=str(path))
    good = {"messages": CONVERSATION[1:3]}
    bad = {"messages": [{"role": "narrator", "content": "x"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good] * 9 + [bad] + [good] * 10)
    prepared = prepare_data(tokenizer, task="chat", train_file=str(path),
                            settings=RenderSettings(skip_invalid_records=True))
    assert len(prepared.train) == 19


ORCA = {"system": "", "question": "Q?", "chosen": "A."}
SHAREGPT = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}


@pytest.mark.parametrize("good, bad, problem", [
    ({"messages": CONVERSATION[1:3]}, {"messages": [{"role": "user"}, CONVERSATION[2]]},
     "message 0: field 'content' is missing (or null); expected a string"),
    ({"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[1:2]},
     "message 0: the conversation must end with an assistant answer to learn from (roles: user)"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt"}]},
     "message 1: field 'value' is missing (or null); expected a string"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": "Q?"}, {"from": "bot", "value": "A."}]},
     "message 1: speaker 'bot' is not allowed; allowed: system, human, gpt"),
    (ORCA, {"system": "", "chosen": "A."}, "field 'question' is missing (or null); expected a string"),
])
def test_record_errors_name_file_and_line(tokenizer, tmp_path, good, bad, problem):
    """A blank line makes record and line numbers differ; the message must give both, as formats.py does."""
    lines = tmp_path / "c.jsonl"
    lines.write_text(f"{json.dumps(good)}\n\n{json.dumps(good)}\n{json.dumps(bad)}\n", encoding="utf-8")
    fix = ". Fix: correct the record, or pass --skip_invalid_records to skip bad records."
    with pytest.raises(DataFormatError, match="^" + re.escape(f"{lines}: record 2 (line 4): {problem}{fix}") + "$"):
        prepare_data(tokenizer, task="chat", train_file=str(lines))
    array = tmp_path / "c.json"  # a JSON array names records by index, as stage 1 records them
    array.write_text(json.dumps([good, good, bad], indent=2), encoding="utf-8")
    with pytest.raises(DataFormatError, match="^" + re.escape(f"{array}: record 2: {problem}{fix}") + "$"):
        prepare_data(tokenizer, task="chat", train_file=str(array))


def test_dropped_conversation_warning_names_the_line(tokenizer, tmp_path, caplog):
    too_long = {"messages": [CONVERSATION[0], {"role": "user", "content": "word " * 200}, CONVERSATION[2]]}
    path = tmp_path / "c.jsonl"
    path.write_text(f"{json.dumps({'messages': CONVERSATION[:3]})}\n\n{json.dumps(too_long)}\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lmtune.data.chat"):
        prepared = prepare_data(tokenizer, task="chat", train_file=str(path),
                                settings=RenderSettings(max_seq_length=1024, max_source_length=100))
    assert len(prepared.train) == 1 and prepared.stats["train"].dropped_indices == [1]
    assert (f"{path}: 1 conversation(s) dropped: the last user turn does not fit --max_source_length 100 / "
            "--max_seq_length 1024 (first: record 1 (line 3)).") in caplog.messages


def test_too_long_drops_oldest_pairs_then_cuts_the_last_answer(tokenizer):
    three_pairs = CONVERSATION + [{"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]
    without_first, _, _ = render_one(tokenizer, [CONVERSATION[0]] + three_pairs[3:])
    ids, labels, stats = render_one(tokenizer, three_pairs, max_seq_length=len(without_first))
    assert ids == without_first and stats.truncated == 1
    assert supervised_spans(tokenizer, ids, labels) == [A2 + "</s>", "6.</s>"]
    # The last pair alone, answer too long: the user text stays whole, the answer is cut, EOS kept.
    long_answer = [CONVERSATION[0], CONVERSATION[3], {"role": "assistant", "content": "four " * 50}]
    prompt = render_prompt(tokenizer, long_answer[:2], resolve_chat_format(None, tokenizer))
    ids, labels, stats = render_one(tokenizer, long_answer, max_seq_length=len(prompt) + 6)
    assert len(ids) == len(prompt) + 6 and ids[: len(prompt)] == prompt and ids[-1] == tokenizer.eos_token_id
    assert supervised_spans(tokenizer, ids, labels) == [tokenizer.decode(ids[len(prompt):])]
    assert tokenizer.decode(ids[len(prompt):]).endswith("</s>") and stats.truncated == 1


def test_prompt_that_cannot_fit_is_dropped_and_counted(tokenizer):
    records = [{"messages": [CONVERSATION[0], {"role": "user", "content": "word " * 200}, CONVERSATION[2]]},
               {"messages": CONVERSATION[:3]}]
    samples, stats = render_chat_records(records, ["messages"], tokenizer, source="t", max_seq_length=1024,
                                         max_source_length=100)
    assert (stats.kept, stats.dropped_long_prompt, stats.dropped_indices) == (1, 1, [0])
    assert U1 in tokenizer.decode(samples["input_ids"][0])
    with pytest.raises(DataFormatError, match=r"t: no conversation fits --max_source_length 20 / --max_seq_length"):
        render_chat_records(records, ["messages"], tokenizer, source="t", max_source_length=20)


def test_inference_prompt_is_the_training_prefix(tokenizer, tmp_path):
    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML, encoding="utf-8")
    for chat_template in (None, "tokenizer", str(template_file)):
        ids, labels, _ = render_one(tokenizer, CONVERSATION, chat_template=chat_template)
        prompt = render_prompt(tokenizer, CONVERSATION[:4], resolve_chat_format(chat_template, tokenizer))
        assert ids[: len(prompt)] == prompt, chat_template
        assert labels[len(prompt):] == ids[len(prompt):]
        assert tokenizer.decode(ids[len(prompt):]).startswith(A2)


def test_tokenizer_and_jinja_file_templates(tokenizer, tmp_path):
    ids, labels, _ = render_one(tokenizer, CONVERSATION, chat_template="tokenizer")
    assert ids == tokenizer.apply_chat_template(CONVERSATION)["input_ids"]  # the template writes no BOS
    assert supervised_spans(tokenizer, ids, labels) == [A1 + "</s>\n", A2 + "</s>\n"]
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML, encoding="utf-8")
    ids, labels, _ = render_one(tokenizer, CONVERSATION, chat_template=str(path))
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=CHATML, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
    assert supervised_spans(tokenizer, ids, labels) == [A1 + "<|im_end|>\n", A2 + "<|im_end|>\n"]


def test_chat_template_errors(tokenizer, tmp_path):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ConfigError, match=r"--chat_template tokenizer: the tokenizer .* has no chat template"):
        resolve_chat_format("tokenizer", bare)
    with pytest.raises(ConfigError, match=r"--chat_template nope\.jinja: no such file; allowed: neural-chat"):
        resolve_chat_format("nope.jinja", tokenizer)
    reverse = ChatFormat("reverse.jinja", "{% for m in messages|reverse %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ConfigError, match=r"does not render conversations incrementally"):
        render_prompt(tokenizer, CONVERSATION[:4], reverse)
    strict = ChatFormat("strict", "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}"
                                  "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataFormatError, match=r"the chat template cannot render this conversation: no system"):
        render_prompt(tokenizer, CONVERSATION[:4], strict)


def test_ultrachat_trains_on_train_sft_and_validates_on_test_sft(tokenizer, shared_data):
    hub = shared_data / "hub/HuggingFaceH4/ultrachat_200k"
    splits = load_splits(dataset_name=str(hub))
    raw = datasets.load_dataset(str(hub))
    assert splits["train"]["prompt_id"] == raw["train_sft"]["prompt_id"]
    assert splits["validation"]["prompt_id"] == raw["test_sft"]["prompt_id"]
    prepared = prepare_data(tokenizer, task="chat", dataset_name=str(hub), max_train_samples=8, max_eval_samples=4,
                            need_validation=True, settings=RenderSettings(max_seq_length=1024, max_source_length=768))
    assert prepared.stats["train"].kept + prepared.stats["train"].dropped_long_prompt == 8
    assert len(prepared.validation) + prepared.stats["validation"].dropped_long_prompt == 4
    first = raw["train_sft"][0]["messages"]
    assert first[-1]["content"][:40] in tokenizer.decode(prepared.train[0]["input_ids"])


@pytest.mark.parametrize("kind, location, task", [
    ("hub", "hub/Open-Orca/SlimOrca", "chat"),
    ("hub", "hub/Intel/orca_dpo_pairs", "chat"),
    ("hub", "hub/Intel/orca_dpo_pairs", "completion"),
    ("file", "files/slimorca_small.jsonl", "chat"),
    ("file", "files/chat_small.jsonl", "chat"),
])
def test_real_stand_ins_render(tokenizer, shared_data, kind, location, task):
    source = {"dataset_name" if kind == "hub" else "train_file": str(shared_data / location)}
    prepared = prepare_data(tokenizer, task=task, max_train_samples=12, **source,
                            settings=RenderSettings(max_seq_length=1024, max_source_length=768))
    stats = prepared.stats["train"]
    assert stats.kept + stats.dropped_long_prompt == 12 and stats.kept >= 6
    for ids, labels in zip(prepared.train["input_ids"], prepared.train["labels"]):
        assert len(ids) <= 1024 and ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
