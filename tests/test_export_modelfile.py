"""The Ollama Modelfile written beside an exported GGUF (``lmtune.export.modelfile``).

Ollama renders ``TEMPLATE`` with Go's ``text/template``; where a Go toolchain is present the
templates are run through it and must give the prompt the model's Jinja template gives.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from lmtune.errors import ConfigError
from lmtune.export.gguf import export_gguf


def test_modelfile_spells_the_neuralchat_format_for_ollama(tiny_llama_dir, tmp_path):
    out = export_gguf(tmp_path / "tiny.gguf", base=str(tiny_llama_dir), dtype="f32")
    text = (tmp_path / "tiny.Modelfile").read_text()
    assert text.startswith("FROM ./tiny.gguf\nTEMPLATE \"\"\"")
    assert ':\n{{ .Content }}</s>\n{{ end }}### Assistant:\n"""' in text
    assert text.endswith('PARAMETER stop "</s>"\nPARAMETER stop "### User:"\n')
    out.unlink()  # the GGUF is gone, but its Modelfile is still the user's
    with pytest.raises(ConfigError, match=r"tiny\.Modelfile exists; .* --no_modelfile"):
        export_gguf(out, base=str(tiny_llama_dir), dtype="f32")


def test_modelfile_for_chatml_and_for_an_unknown_template(tiny_llama_dir, tmp_path):
    from lmtune.export.modelfile import render_modelfile

    base = tmp_path / "chatml"
    LlamaForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
                               "+ '<|im_end|>\\n' }}{% endfor %}")
    tokenizer.save_pretrained(base)
    out = export_gguf(tmp_path / "chatml.gguf", base=str(base), dtype="f32", modelfile=False)
    assert not (tmp_path / "chatml.Modelfile").exists()
    text = render_modelfile(out)
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n" in text
    assert text.endswith('PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\n')

    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    tokenizer.save_pretrained(base)
    out = export_gguf(tmp_path / "other.gguf", base=str(base), dtype="f32", modelfile=False)
    assert render_modelfile(out) == 'FROM ./other.gguf\nPARAMETER stop "</s>"\n'  # Ollama reads the template


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var input struct {
		Template string
		Messages []Message
	}
	json.NewDecoder(os.Stdin).Decode(&input)
	template.Must(template.New("t").Parse(input.Template)).Execute(os.Stdout, map[string]any{"Messages": input.Messages})
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain to run Ollama's template engine (text/template)")
@pytest.mark.parametrize("kind", ["chatml", "neuralchat"])
def test_modelfile_templates_render_the_jinja_prompt_in_gos_template_engine(kind, tmp_path):
    """Ollama renders TEMPLATE with Go's text/template: it must give the prompt the Jinja template gives."""
    from jinja2 import Template

    from lmtune.demo import NEURALCHAT_CHAT_TEMPLATE
    from lmtune.export.modelfile import CHATML_TEMPLATE, NEURALCHAT_TEMPLATE

    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{{ '<|im_start|>assistant\\n' }}")
    go_template, jinja = {"chatml": (CHATML_TEMPLATE, chatml),
                          "neuralchat": (NEURALCHAT_TEMPLATE.replace("{eos}", "</s>"), NEURALCHAT_CHAT_TEMPLATE)}[kind]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    (tmp_path / "render.go").write_text(GO_RENDER)
    stdin = json.dumps({"Template": go_template, "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                              for m in messages]})
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath")}
    rendered = subprocess.run(["go", "run", str(tmp_path / "render.go")], input=stdin, capture_output=True,
                              text=True, check=True, env=env, timeout=300).stdout
    expected = Template(jinja).render(messages=messages, add_generation_prompt=True, eos_token="</s>")
    assert rendered == expected
