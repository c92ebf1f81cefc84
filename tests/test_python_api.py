"""The README's Python API example runs as written, also after the module behind it has been imported."""

from __future__ import annotations

import json
import re
import shutil

import lmtune.finetuning  # noqa: F401  imported first on purpose: it must not shadow lmtune.finetune

from conftest import PROJECT_ROOT


def readme_python_example() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_package_attribute_is_the_function():
    import lmtune
    from lmtune import finetune

    assert finetune is lmtune.finetuning.finetune and callable(finetune)


def test_readme_python_example_runs_as_written(tiny_llama_dir, demo_records, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llama_dir, tmp_path / "tiny-llama")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_records[:16]), encoding="utf-8")
    namespace: dict = {}
    exec(readme_python_example(), namespace)  # noqa: S102  the README's own code, unchanged
    metrics = namespace["metrics"]
    assert metrics["train_loss"] > 0 and metrics["epoch"] > 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 100
