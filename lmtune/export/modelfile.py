"""An Ollama ``Modelfile`` beside an exported GGUF: ``ollama create NAME -f FILE.Modelfile``.

Ollama formats a conversation with a Go template, not the Jinja chat template a GGUF
carries. For the two formats lmtune trains with, ChatML (SmolLM2, Qwen) and NeuralChat's
``### User:`` format, the Modelfile spells the same prompt as a Go template, with the
format's end-of-turn markers as stop sequences. Any other template is left to Ollama,
which reads ``tokenizer.chat_template`` from the GGUF and matches it against the
templates it knows; the Modelfile then only names the file and the EOS stop.

Everything is read back from the written GGUF, so the Modelfile describes that file.
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader

CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
# NeuralChat: "### Role:\n" + content + EOS + "\n" per message, then "### Assistant:\n" (lmtune.demo).
NEURALCHAT_TEMPLATE = (
    '{{- range .Messages }}### {{ if eq .Role "system" }}System{{ else if eq .Role "user" }}User'
    "{{ else }}Assistant{{ end }}:\n{{ .Content }}{eos}\n{{ end }}### Assistant:\n"
)


def modelfile_path(gguf_file: Path) -> Path:
    return gguf_file.with_suffix(".Modelfile")


def chat_format(template: str | None) -> str | None:
    """"chatml", "neuralchat", or None for a Jinja chat template."""
    if not template:
        return None
    if "<|im_start|>" in template and "<|im_end|>" in template:
        return "chatml"
    if "### User:" in template and "### Assistant:" in template:
        return "neuralchat"
    return None


def render_modelfile(gguf_file: Path) -> str:
    """The Modelfile text for ``gguf_file``, from the chat template and EOS token stored in it."""
    fields = GGUFReader(gguf_file).fields
    template = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None
    eos_id = fields["tokenizer.ggml.eos_token_id"].contents() if "tokenizer.ggml.eos_token_id" in fields else None
    eos = fields["tokenizer.ggml.tokens"].contents(eos_id) if eos_id is not None else None
    lines = [f"FROM ./{gguf_file.name}"]
    kind = chat_format(template)
    if kind == "chatml":
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        stops = ["<|im_start|>", "<|im_end|>"]
    elif kind == "neuralchat":
        lines.append(f'TEMPLATE """{NEURALCHAT_TEMPLATE.replace("{eos}", eos or "")}"""')
        stops = [eos, "### User:"]
    else:
        stops = [eos]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops if stop]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_file: Path) -> Path:
    """Write ``FILE.Modelfile`` beside ``FILE.gguf``; the caller checked it may be (over)written."""
    path = modelfile_path(gguf_file)
    path.write_text(render_modelfile(gguf_file), encoding="utf-8")
    return path
