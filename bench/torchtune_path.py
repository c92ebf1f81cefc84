"""torchtune's single-device LoRA recipe on the benchmark's records, on CPU, from local files.

torchtune 0.6.1 is the last release; it installs beside torch 2.13 without pulling another
torch, but imports ``torchao.dtypes.nf4tensor``, which torchao 0.14 and later moved: it needs
``torchao<=0.13`` (0.13.0 works; its compiled kernels do not load with torch 2.13, and the
LoRA recipe does not need them). The benchmark runs it from a separate interpreter
(``--torchtune-python``, e.g. a ``venv --system-site-packages`` with ``torchtune==0.6.1
torchao==0.13.0``), so the project's environment is left alone.

What runs: ``recipes/lora_finetune_single_device.py`` (``LoRAFinetuneRecipeSingleDevice``)
with a config built here: ``lora_llama2`` with the benchmark model's dimensions, read by
``FullModelHFCheckpointer`` (``model_type: LLAMA2``) straight from the model directory;
``llama2_tokenizer`` on the same SentencePiece file (BOS and EOS added), ``alpaca_dataset``
from the same JSON file with the Stanford Alpaca prompt (the reference's text) and
``train_on_input: False``; LoRA r=8/alpha 16/dropout 0.05 on q_proj/v_proj; batch, length,
lr 1e-4 (AdamW) and one epoch as every variant. The rest is the recipe's default: no packing
(``packed`` variant: ``packed: True``), no activation checkpointing, no compile, chunked
cross-entropy (``CEWithChunkedOutputLoss``), and the model in ``dtype`` (bf16 is real bf16
weights and arithmetic, no autocast; on a CPU without bf16 units the benchmark passes fp32).
Only the adapter is saved, as lmtune does. Llama-2's builder has an untied head and rope base
10000, so only the ``llama-134m`` preset fits it (SmolLM2 ties its head and uses base 100000).
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def recipe_config(*, model_dir: str, train_file: str, output_dir: str, max_seq_length: int, batch_size: int,
                  bf16: bool, packed: bool, seed: int = 42):
    from omegaconf import OmegaConf

    model = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    rope_base = model.get("rope_parameters", {}).get("rope_theta", model.get("rope_theta", 10000.0))
    if model.get("tie_word_embeddings") or rope_base != 10000.0:
        raise SystemExit("torchtune's lora_llama2 builder needs an untied head and rope base 10000")
    return OmegaConf.create({
        "output_dir": output_dir,
        "model": {
            "_component_": "torchtune.models.llama2.lora_llama2",
            "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False, "apply_lora_to_output": False,
            "vocab_size": model["vocab_size"], "num_layers": model["num_hidden_layers"],
            "num_heads": model["num_attention_heads"],
            "num_kv_heads": model.get("num_key_value_heads", model["num_attention_heads"]),
            "embed_dim": model["hidden_size"], "intermediate_dim": model["intermediate_size"],
            "max_seq_len": model["max_position_embeddings"], "norm_eps": model["rms_norm_eps"],
            "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        },
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer",
                      "path": str(Path(model_dir) / "tokenizer.model"), "max_seq_len": max_seq_length},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": model_dir,
                         "checkpoint_files": ["model.safetensors"], "adapter_checkpoint": None,
                         "recipe_checkpoint": None, "output_dir": output_dir, "model_type": "LLAMA2"},
        "resume_from_checkpoint": False, "save_adapter_weights_only": True,
        "dataset": {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json", "data_files": train_file,
                    "split": "train", "train_on_input": False, "packed": packed},
        "seed": seed, "shuffle": True, "batch_size": batch_size,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                         "num_warmup_steps": 0},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "epochs": 1, "max_steps_per_epoch": None, "gradient_accumulation_steps": 1, "clip_grad_norm": None,
        "compile": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": f"{output_dir}/logs"},
        "log_every_n_steps": 1, "log_peak_memory_stats": False, "device": "cpu", "dtype": "bf16" if bf16 else "fp32",
        "enable_activation_checkpointing": False, "enable_activation_offloading": False,
    })


def recipe_class():
    """``LoRAFinetuneRecipeSingleDevice`` from the recipe file torchtune installs (``recipes`` refuses imports)."""
    import importlib.util

    import torchtune

    path = Path(torchtune.__file__).parents[1] / "recipes" / "lora_finetune_single_device.py"
    spec = importlib.util.spec_from_file_location("lora_finetune_single_device", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LoRAFinetuneRecipeSingleDevice


def run_torchtune(spec: dict, record: dict) -> dict:
    """One epoch of the recipe; fills ``record`` with step start times as the worker's step timer does."""
    LoRAFinetuneRecipeSingleDevice = recipe_class()

    cfg = recipe_config(model_dir=spec["model_dir"], train_file=spec["train_file"], output_dir=spec["output_dir"],
                        max_seq_length=spec["max_seq_length"], batch_size=spec["batch_size"], bf16=spec["bf16"],
                        packed=spec.get("packed", False))
    recipe = LoRAFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    losses: list[float] = []
    loss_step, log_dict = recipe._loss_step, recipe._metric_logger.log_dict

    def timed_loss_step(batch):
        record["steps"].append((time.perf_counter(), *batch["tokens"].shape))
        return loss_step(batch)

    def logged(payload, step):
        losses.append(float(payload["loss"]))
        return log_dict(payload, step)

    recipe._loss_step, recipe._metric_logger.log_dict = timed_loss_step, logged
    record["train_start"] = time.perf_counter()
    recipe.train()
    record["train_end"] = time.perf_counter()
    recipe.cleanup()
    tokens = _dataset_tokens(recipe, cfg)
    return {"train_loss": sum(losses) / max(len(losses), 1), "final_loss": losses[-1] if losses else float("nan"),
            "steps": recipe.global_step, "dataset_tokens": tokens, "rows": len(recipe._dataloader.dataset),
            "compute": cfg.dtype, "weights": cfg.dtype}


def _dataset_tokens(recipe, cfg) -> int:
    """Tokens of the prepared samples (pads excluded): from the unpacked samples even when packed."""
    from omegaconf import OmegaConf
    from torchtune import config

    samples = config.instantiate(OmegaConf.merge(cfg.dataset, {"packed": False}), recipe._tokenizer)
    return sum(len(samples[i]["tokens"]) for i in range(len(samples)))
