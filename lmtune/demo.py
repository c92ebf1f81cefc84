"""The demo that lmtune's quick start trains: shipped data plus a tiny local model.

Stage contract: ``demo_data_path()`` points at ``lmtune/assets/demo_instructions.jsonl``
(Alpaca schema, written for lmtune, Apache-2.0). ``build_demo_model(dir)`` trains a
byte-level BPE tokenizer on that data and saves it with a randomly initialised tiny
``LlamaForCausalLM`` into ``dir``, so that ``AutoModelForCausalLM.from_pretrained(dir)``
and ``AutoTokenizer.from_pretrained(dir)`` work with no hub access. Building takes
seconds on a 2-core CPU; the result is cached and never overwrites foreign files.

Example::

    from lmtune.demo import build_demo_model, default_demo_dir
    model_dir = build_demo_model(default_demo_dir())
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmtune.errors import ConfigError

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
DEMO_MARKER = "lmtune_demo.json"
# Bump when the build recipe changes, so stale caches are detected rather than reused.
_RECIPE_VERSION = 2  # 2: a short pre-training pass on plain text
_DEMO_FILES = (
    "config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json",
)

# NeuralChat's prompt format. Expressions (not literal text) carry the newlines so that
# Jinja whitespace control cannot eat them.
NEURALCHAT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '### System:\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Assistant:\\n' }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']"
    " + '; allowed: system, user, assistant') }}"
    "{%- endif -%}"
    "{{ message['content'] + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}"
)


def demo_data_path() -> Path:
    """Return the path of the instruction data set that ships with lmtune.

    Returns:
        Path to ``demo_instructions.jsonl``: Alpaca-schema records (``instruction``,
        ``input``, ``output``), one JSON object per line.
    """
    return Path(str(resources.files("lmtune.assets").joinpath("demo_instructions.jsonl")))


def load_demo_records() -> list[dict[str, str]]:
    """Read the shipped demo data set.

    Returns:
        The records of ``demo_data_path()`` in file order.
    """
    with demo_data_path().open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def default_demo_dir() -> Path:
    """Return where the quick start caches the demo model.

    Returns:
        ``$LMTUNE_HOME/demo-model-v<recipe>``, with ``LMTUNE_HOME`` defaulting to ``~/.cache/lmtune``.
        The recipe version is in the name so that an upgraded lmtune builds its new demo beside
        an old one instead of refusing to touch it.
    """
    home = os.environ.get("LMTUNE_HOME") or Path.home() / ".cache" / "lmtune"
    return Path(home).expanduser() / f"demo-model-v{_RECIPE_VERSION}"


def build_demo_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024
) -> transformers.PreTrainedTokenizerFast:
    """Train a LLaMA-like byte-level BPE tokenizer on ``texts``.

    The result is deterministic for the same texts. Encoding prepends ``<s>`` and adds no
    ``</s>``; decoding reproduces any text exactly (byte-level, so there is no unknown
    character). The tokenizer carries NeuralChat's chat template and pads on the right.

    Args:
        texts: Training text; a few thousand short strings are plenty.
        vocab_size: Upper bound on the vocabulary, including the 4 special tokens and
            256 byte tokens. Small corpora may stop short of it.

    Returns:
        A fast tokenizer with ``<s>`` (bos), ``</s>`` (eos), ``<pad>`` (pad) and
        ``<unk>`` (unk) at ids 1, 2, 3 and 0.

    Raises:
        ConfigError: If ``vocab_size`` cannot hold the special and byte tokens.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 4:
        raise ConfigError(
            f"vocab_size must be >= {len(alphabet) + 4} to hold 256 byte tokens and 4 special "
            f"tokens (got {vocab_size}); pass a larger vocab_size."
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        # LLaMA convention: BOS before every sequence, EOS left to the data pipeline.
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        ),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        # Cleanup would turn "a ." into "a." and break exact round trips.
        clean_up_tokenization_spaces=False,
        chat_template=NEURALCHAT_CHAT_TEMPLATE,
    )


def build_demo_model(
    output_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 172,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Build, or reuse, a tiny random LLaMA and its tokenizer in ``output_dir``.

    If ``output_dir`` already holds a demo model built with the same settings, nothing is
    written. The build happens in a temporary sibling folder that is renamed into place,
    so an interrupted build never leaves a half-written ``output_dir``.

    Args:
        output_dir: Folder to create; it may exist if it is empty.
        hidden_size: Model width.
        num_layers: Number of decoder layers.
        num_heads: Attention heads; must divide ``hidden_size``.
        num_kv_heads: Key/value heads (grouped-query attention); must divide ``num_heads``.
        intermediate_size: Width of the MLP.
        max_position_embeddings: Longest sequence the model and tokenizer accept.
        seed: Seed for the random weights.

    Returns:
        ``output_dir`` as a ``Path``, loadable with ``AutoModelForCausalLM`` and
        ``AutoTokenizer``.

    Raises:
        ConfigError: If ``output_dir`` holds anything other than a complete demo model
            with these settings, or if the settings are inconsistent.
    """
    output_dir = Path(output_dir).expanduser()
    settings = _demo_settings({
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
    })
    if _is_built(output_dir, settings):
        return output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model folder should not be
    try:
        _write_demo_model(staging, settings)
        _move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Another process may have won the race; either way the folder must now match.
    if not _is_built(output_dir, settings):
        raise ConfigError(f"demo model in {output_dir} is incomplete; delete the folder and retry.")
    return output_dir


def _demo_settings(settings: dict[str, int]) -> dict:
    """Validate the build settings and return the marker content that identifies the build."""
    problems = [f"{k} must be > 0 (got {v})" for k, v in settings.items() if k != "seed" and v <= 0]
    if not problems and settings["hidden_size"] % settings["num_heads"]:
        problems.append(
            f"hidden_size ({settings['hidden_size']}) must be divisible by num_heads "
            f"({settings['num_heads']})"
        )
    if not problems and settings["num_heads"] % settings["num_kv_heads"]:
        problems.append(
            f"num_heads ({settings['num_heads']}) must be divisible by num_kv_heads "
            f"({settings['num_kv_heads']})"
        )
    if problems:
        raise ConfigError("invalid demo model settings: " + "; ".join(problems) + ".")
    data_hash = hashlib.sha256(demo_data_path().read_bytes()).hexdigest()
    return {"recipe_version": _RECIPE_VERSION, "data_sha256": data_hash, **settings}


def _is_built(output_dir: Path, settings: dict) -> bool:
    """Return True if ``output_dir`` is a finished demo build with ``settings``.

    Raises:
        ConfigError: If ``output_dir`` exists, is not empty, and is not that build.
    """
    if not output_dir.exists():
        return False
    if not output_dir.is_dir():
        raise ConfigError(f"demo model path {output_dir} is a file; pass a folder path.")
    if not any(output_dir.iterdir()):
        return False
    marker = output_dir / DEMO_MARKER
    try:
        found = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    if not isinstance(found, dict):
        raise ConfigError(
            f"{output_dir} is not empty and is not an lmtune demo model (no valid {DEMO_MARKER}); "
            "refusing to write into it. Pass an empty or new folder."
        )
    changed = [
        f"{key}: built {str(found.get(key))[:12]}, asked {str(settings.get(key))[:12]}"
        for key in sorted(settings.keys() | found.keys())
        if found.get(key) != settings.get(key)
    ]
    if changed:
        raise ConfigError(
            f"{output_dir} holds a demo model built with different settings "
            f"({'; '.join(changed)}); delete the folder or pass another output_dir."
        )
    missing = [name for name in _DEMO_FILES if not (output_dir / name).is_file()]
    if missing:
        raise ConfigError(
            f"demo model in {output_dir} is missing {', '.join(missing)}; "
            "delete the folder and retry."
        )
    return True


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename the finished build to ``output_dir``, replacing at most an empty folder."""
    try:
        if output_dir.is_dir():
            output_dir.rmdir()  # only succeeds if empty, which _is_built checked
        staging.rename(output_dir)
    except OSError:
        # A concurrent build may have got there first; the caller then checks its result.
        if not (output_dir / DEMO_MARKER).is_file():
            raise


def _demo_texts(records: Iterable[dict[str, str]]) -> Iterator[str]:
    """Yield training text for the tokenizer, in the prompt layout fine-tuning will use."""
    for record in records:
        prompt = record["instruction"]
        if record["input"]:
            prompt += "\n" + record["input"]
        yield f"### System:\n### User:\n{prompt}\n### Assistant:\n{record['output']}\n"


def _plain_texts(records: Iterable[dict[str, str]]) -> list[str]:
    """The demo facts as plain sentences, in no prompt format: what a base model has read."""
    return [" ".join(filter(None, (r["instruction"], r["input"], r["output"]))) for r in records]


def _pretrain(model: LlamaForCausalLM, tokenizer, texts: list[str], steps: int = 120, batch_size: int = 16) -> None:
    """A few seconds of plain language modelling, so that the demo is a (tiny) pretrained model.

    Fine-tuning a random network with LoRA barely moves its loss; a base model that has
    seen the words and facts, but never the instruction format, shows what fine-tuning
    is for: learning the format and the answers' shape.
    """
    encoded = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 150K-parameter model runs fastest on one thread
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        batch = tokenizer.pad({"input_ids": [encoded[i] + [tokenizer.eos_token_id] for i in picks]},
                              return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    torch.set_num_threads(threads)


def _write_demo_model(folder: Path, settings: dict) -> None:
    """Train the tokenizer, build the random model and save both plus the marker."""
    tokenizer = build_demo_tokenizer(_demo_texts(load_demo_records()))
    tokenizer.model_max_length = settings["max_position_embeddings"]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings["hidden_size"],
        num_hidden_layers=settings["num_layers"],
        num_attention_heads=settings["num_heads"],
        num_key_value_heads=settings["num_kv_heads"],
        intermediate_size=settings["intermediate_size"],
        max_position_embeddings=settings["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(settings["seed"])
        model = LlamaForCausalLM(config).to(torch.float32)
        _pretrain(model, tokenizer, _plain_texts(load_demo_records()))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64,
        do_sample=False,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Written last: its presence means the build finished.
    (folder / DEMO_MARKER).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
