"""LoRA's input dropout on CPU: ``nn.Dropout`` against lmtune's 16-bit mask, alone and in whole steps.

    python bench/bench_dropout.py              # bf16 autocast, as lmtune trains where bf16 pays
    python bench/bench_dropout.py --float32

1. The dropout alone (``lmtune/model/lora_dropout.py``), p 0.05 on 2048 x 768 float32 (peft casts
   LoRA's input to the adapter's dtype), forward and backward.
2. Whole training steps of the 134M LLaMA (random weights, LoRA r 8 on q/v, 4 rows of 512 packed
   from Alpaca-like sample lengths, a new draw of rows each step) with each dropout, interleaved
   step by step so a noisy machine slows both alike.

Needs nothing beside the project. Prints medians and the ratios, stock over lmtune.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmtune.finetuning  # noqa: E402,F401  OpenMP settings first, as the CLI does
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from bench.assets import MODEL_PRESETS  # noqa: E402
from lmtune.data.packing import plan_bins  # noqa: E402
from lmtune.model.packed_attention import use_packed_attention  # noqa: E402
from lmtune.model.lora_dropout import SixteenBitDropout  # noqa: E402
from lmtune.train.loss import causal_lm_loss_sum  # noqa: E402

def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: kernel selection, allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def dropout_table(dtype: torch.dtype, repeats: int) -> None:
    x = torch.randn(2048, 768, dtype=dtype, requires_grad=True)
    print(f"\n1. LoRA input dropout p 0.05, 2048 x 768 {str(dtype)[6:]}, forward + backward, median of {repeats}, ms")
    print("| nn.Dropout | 16-bit mask | ratio |\n|---|---|---|")
    stock, sixteen = torch.nn.Dropout(0.05), SixteenBitDropout(0.05)
    times = [median_ms(lambda d=d: d(x).sum().backward(), repeats) for d in (stock, sixteen)]
    print(f"| {times[0]:.2f} | {times[1]:.2f} | {times[0] / times[1]:.2f}x |")


def packed_batches(steps: int, rows: int = 4, length: int = 512) -> list[torch.Tensor]:
    """position_ids of ``steps`` batches: Alpaca-like sample lengths (median ~150) packed best-fit."""
    generator = torch.Generator().manual_seed(0)
    lengths = (torch.randn(steps * rows * 6, generator=generator) * 0.6 + 5.0).exp().clamp(16, length).int().tolist()
    bins = [b for b in plan_bins(lengths, length) if sum(lengths[i] for i in b) > length * 0.9][: steps * rows]
    positions = [torch.cat([torch.arange(lengths[i]) for i in b] + [torch.arange(length - sum(lengths[i] for i in b))])
                 for b in bins]
    return [torch.stack(positions[s * rows:(s + 1) * rows]) for s in range(steps)]


def step_table(dtype: torch.dtype, rounds: int) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, **MODEL_PRESETS["llama-134m"])
    model = LlamaForCausalLM(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    use_packed_attention(model)
    model.train()
    lora_layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]
    stock_dropout = {id(m): m.lora_dropout["default"] for m in lora_layers}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    variants = {"nn.Dropout": False, "16-bit mask (lmtune)": True}
    batches = packed_batches(rounds * len(variants) + 1)
    samples = sum(int((b == 0).sum()) for b in batches) / len(batches)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for index, positions in enumerate(batches):
        name = list(variants)[index % len(variants)]
        sixteen = variants[name]
        for m in lora_layers:
            m.lora_dropout["default"] = SixteenBitDropout(0.05) if sixteen else stock_dropout[id(m)]
        input_ids = torch.randint(3, config.vocab_size, positions.shape)
        labels = input_ids.masked_fill(torch.rand(positions.shape) < 0.45, -100)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            hidden = model.get_base_model().model(input_ids=input_ids, position_ids=positions).last_hidden_state
            total, count = causal_lm_loss_sum(hidden, model.get_base_model().lm_head.weight, labels)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        if index:  # the first step allocates and picks kernels
            times[name].append(time.perf_counter() - start)
    print(f"\n2. training step, llama-134m {str(dtype)[6:]} weights, LoRA r 8 q/v, 4 x 512 packed rows "
          f"({samples:.1f} samples a batch), {rounds} steps each, interleaved; median s")
    print("| variant | step s | stock / variant |\n|---|---|---|")
    base = statistics.median(times["nn.Dropout"])
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} | {base / statistics.median(values):.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--float32", action="store_true", help="float32 weights, no autocast")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=8, help="Training steps of each variant.")
    args = parser.parse_args(argv)
    dtype = torch.float32 if args.float32 else torch.bfloat16
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, {'float32' if args.float32 else 'bf16 autocast'}")
    dropout_table(torch.float32, args.repeats)  # LoRA's input is float32: peft casts it to the adapter's dtype
    step_table(dtype, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
