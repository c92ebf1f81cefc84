"""lmtune: fine-tune pretrained language models on instruction data and chat with them."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from lmtune import finetune` without importing torch/transformers on `import lmtune`.
    if name == "finetune":
        from lmtune.finetuning import finetune

        return finetune
    raise AttributeError(f"module 'lmtune' has no attribute '{name}'")
