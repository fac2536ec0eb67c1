"""Tokens/s and model FLOP utilisation (MFU) of a Llama-shaped causal LM of about 1.1B parameters
(hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocabulary 32000, sequences of 2048;
random init, built with transformers, sdpa attention), full fine-tuning and LoRA, as a plain
PyTorch loop and through DeepSpeed. GPU numbers only; `--shape tiny` runs a toy size anywhere
as a smoke test of the script.

Precision: bf16 autocast everywhere. Full fine-tuning keeps fp32 master weights (fused AdamW on
them, gradient clipping 1.0); LoRA freezes the base in bf16 and trains fp32 adapters (r 16 on
every attention and MLP projection). DeepSpeed runs the same model with torch_autocast (ZeRO
stage `--ds-stage`, default 2 as in ../shared/GPU.md).

FLOPs per token (counted, not measured; recomputation under `--grad-ckpt` is not counted):
  full: 6 * N + 6 * L * S * d           N = parameters doing matmuls (all but the input embedding)
  LoRA: 4 * N + 6 * N_lora + 6 * L * S * d   (frozen weights: forward 2N + input gradients 2N,
                                         no weight gradients; the adapters cost 6 per parameter)
  6 * L * S * d is causal attention: QK^T and AV, 2 * S * d per layer and token forward (half of
  the full square), times 3 with the backward. MFU = tokens/s * FLOPs per token / 989e12 (dense
  bf16 peak of an H100/H200 SXM). `mfu_gpu_md` repeats the count of ../shared/GPU.md (N = all
  parameters, embedding included), which reads about 5 % higher on this model.

    python3 bench/llm_throughput.py                               # the GPU machine: full + LoRA, plain
    python3 bench/llm_throughput.py --engines deepspeed           # the same through DeepSpeed
    .venv/bin/python bench/llm_throughput.py --shape tiny --steps 2 --warmup 1   # smoke test on CPU
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write  # noqa: E402

PEAK_BF16 = 989e12
SHAPES = {
    "reference": {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "intermediate": 5632, "vocab": 32000, "seq": 2048},
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 172, "vocab": 512, "seq": 64},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def flops_per_token(mode: str, n_matmul: int, n_lora: int, s: dict) -> float:
    attention = 6 * s["layers"] * s["seq"] * s["hidden"]
    if mode == "full":
        return 6 * n_matmul + attention
    return 4 * n_matmul + 6 * n_lora + attention


def build_model(s: dict, mode: str, device, grad_ckpt: bool, compile_layers: bool, lora_r: int):
    """(model, parameters, parameters doing matmuls, trainable parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         max_position_embeddings=s["seq"], tie_word_embeddings=False, use_cache=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    n_matmul = params - model.get_input_embeddings().weight.numel()
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = model.to(torch.bfloat16)  # the frozen base in bf16; peft keeps the adapters in fp32
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    if compile_layers:  # regional compilation: one compiled decoder layer, reused by all 22
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                module.compile()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, params, n_matmul, trainable


def init_distributed(cuda: bool) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)


def measure(mode: str, engine_kind: str, a, s: dict, device, batch: int) -> dict:
    import torch

    cuda = device.type == "cuda"
    model, params, n_matmul, trainable = build_model(s, mode, device, a.grad_ckpt, a.compile, a.lora_r)
    model.train()
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable_params, lr=1e-5, weight_decay=0.0, fused=cuda or None)
    engine = None
    if engine_kind == "deepspeed":
        import deepspeed

        from indai.trainers.engine import ds_config

        init_distributed(cuda)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, dist_init_required=False,
                                               config=ds_config(batch, 1, a.ds_stage, False, clip=1.0, bf16=True))
    tokens = torch.randint(0, s["vocab"], (batch, s["seq"]), device=device)

    def step() -> torch.Tensor:
        if engine is not None:
            loss = engine(input_ids=tokens, labels=tokens).loss
            engine.backward(loss)
            engine.step()
            return loss
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_params, 1.0, foreach=cuda or None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tok_s = batch * s["seq"] * a.steps / secs
    n_lora = trainable if mode == "lora" else 0
    fpt = flops_per_token(mode, n_matmul, n_lora, s)
    fpt_gpu_md = 6 * params + 6 * s["layers"] * s["seq"] * s["hidden"] if mode == "full" else None
    row = {"mode": mode, "engine": engine_kind, "ds_stage": a.ds_stage if engine_kind == "deepspeed" else None,
           "shape": a.shape, "batch": batch, "seq": s["seq"], "params": params, "params_matmul": n_matmul,
           "trainable": trainable, "compile": a.compile, "grad_ckpt": a.grad_ckpt, "warmup_steps": a.warmup,
           "measured_steps": a.steps, "warmup_s": round(warm_s, 2), "step_ms": round(1000 * secs / a.steps, 2),
           "tokens_per_s": round(tok_s, 1), "flops_per_token": fpt, "tflops": round(tok_s * fpt / 1e12, 2),
           "mfu": round(tok_s * fpt / PEAK_BF16, 4),
           "mfu_gpu_md": round(tok_s * fpt_gpu_md / PEAK_BF16, 4) if fpt_gpu_md else None,
           "final_loss": round(float(loss.item()), 4),
           "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
           "device": str(device), "gpu": torch.cuda.get_device_name(device) if cuda else None, "note": a.note}
    return row  # the model, optimizer and engine go with this frame; main() then empties the cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="reference")
    ap.add_argument("--modes", choices=["full", "lora"], nargs="+", default=["full", "lora"])
    ap.add_argument("--engines", choices=["plain", "deepspeed"], nargs="+", default=["plain"])
    ap.add_argument("--batch", type=int, help="sequences per step (default: 8 with 120 GiB or more of GPU memory, else 4; 2 on CPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (regional compilation)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (recomputation is not counted in MFU)")
    ap.add_argument("--ds-stage", type=int, choices=[0, 1, 2, 3], default=2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    import torch

    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda:0" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    batch = a.batch or (2 if not cuda else 8 if torch.cuda.get_device_properties(device).total_memory >= 120 * 2**30 else 4)
    s = SHAPES[a.shape]
    rows = []
    for engine_kind in a.engines:
        for mode in a.modes:
            t0 = time.perf_counter()
            try:
                row = measure(mode, engine_kind, a, s, device, batch)
            except torch.cuda.OutOfMemoryError as e:
                row = {"mode": mode, "engine": engine_kind, "shape": a.shape, "batch": batch, "error": f"out of memory: {e}"[:300],
                       "note": a.note}
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            rows.append(row)
            write("llm_throughput", row)
            print(f"{engine_kind} {mode}: {row.get('tokens_per_s')} tokens/s, MFU {row.get('mfu')} "
                  f"({time.perf_counter() - t0:.1f} s in all)", file=sys.stderr, flush=True)
    print(f"{'engine':<10}{'mode':<6}{'batch':>6}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'MFU(GPU.md)':>12}{'peak GiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:<10}{r['mode']:<6}{r['batch']:>6}  {r['error'][:60]}")
            continue
        gm = f"{r['mfu_gpu_md']:.3f}" if r["mfu_gpu_md"] is not None else "-"
        pk = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['engine']:<10}{r['mode']:<6}{r['batch']:>6}{r['tokens_per_s']:>11.0f}{r['tflops']:>9.1f}{r['mfu']:>7.3f}{gm:>12}{pk:>10}")


if __name__ == "__main__":
    main()
