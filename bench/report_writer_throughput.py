"""Tokens/s and model FLOP utilisation (MFU) of the report writer itself: the ~1.1B Llama-shaped
LM of bench/llm_throughput.py with LoRA, behind its sensor and image prefix encoders (flavour
`base`: a 4-layer patch transformer over 16 x 1024 samples and resnet50 at 224 px, 8 prefix
embeddings each), trained the way `indai train` trains it, against a plain PyTorch LoRA loop over
the bare LM and the same tokens. GPU numbers; `--shape tiny` runs the debug flavour anywhere as a
smoke test of the script.

Ways, one process, one model at a time:
  lm_lora        the baseline: the bare LM (frozen base in bf16, fp32 LoRA adapters with the
                 flavour's rank and targets, the same gradient checkpointing), sequences of
                 prefix + prompt + response token ids, loss on the response, bf16 autocast,
                 fused AdamW, clipping 1.0. No encoders, no batch assembly.
  indai          the report writer through indai's own pieces: `ReportWriter` (random weights),
                 the frozen LM held in bf16 (`hold_frozen_in_bf16`, as `train_report_writer`
                 does on CUDA), `trainers.engine.build_engine` (strategy auto), batches made by
                 the data module's `collate` from host memory and moved by `to_device`, each step
                 `engine(**inputs)`, `backward`, `step`.
  indai_compile  the same with `run.compile`: regional compilation of each decoder layer and
                 each prefix encoder (`trainers.engine.compile_regions`).

FLOPs are counted, not estimated: one training step (forward and backward, gradient
checkpointing off so recomputation is not counted) of each model runs under
`torch.utils.flop_counter.FlopCounterMode`, which counts every matmul, convolution and attention
call, prefix encoders included. Attention is then counted as llm_throughput.py counts it (causal:
half the square, 6 L S d per token) instead of the counter's whole square with the flash
backward's recomputation (`counted_flops_per_step` keeps the raw count); for full fine-tuning of
the bare LM this gives exactly llm_throughput.py's 6 N + 6 L S d per token (a test checks it).
MFU = FLOPs per step / measured seconds per step / 989e12 (dense bf16 peak of an H100/H200 SXM).
Tokens/s counts every position the LM runs (prefix + prompt + response); response tokens/s
counts the ones that carry the loss.

    python3 bench/report_writer_throughput.py                     # the GPU machine
    python3 bench/report_writer_throughput.py --ways indai indai_compile --batch 4
    .venv/bin/python bench/report_writer_throughput.py --shape tiny   # smoke test on CPU
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write  # noqa: E402

PEAK_BF16 = 989e12
SHAPES = {
    # the LM of llm_throughput.py's reference shape; prompt + response fill the flavour's bounds
    "reference": {"lm": {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "intermediate": 5632, "vocab": 32000},
                  "flavour": "base", "prompt": 496, "response": 512, "sensor": (16, 1024), "image": 224,
                  "warmup": 5, "steps": 10},  # compiled: the first steps compile forward and backward
    "tiny": {"lm": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 512},
             "flavour": "debug", "prompt": 40, "response": 40, "sensor": (2, 128), "image": 32, "warmup": 4, "steps": 3},
}
WAYS = ("lm_lora", "indai", "indai_compile")


def lm_folder(folder: Path, lm: dict) -> Path:
    """A Hugging Face folder with the LM's config and a tokenizer (no weights: random init)."""
    from transformers import LlamaConfig

    from indai.trainers.models.report_writer.tiny import SPECIAL, train_tokenizer

    tokenizer = train_tokenizer(["maintenance report: bearing fault, pump leak, 베어링 결함"] * 4, 300)
    tokenizer.save_pretrained(folder)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    LlamaConfig(vocab_size=lm["vocab"], hidden_size=lm["hidden"], intermediate_size=lm["intermediate"],
                num_hidden_layers=lm["layers"], num_attention_heads=lm["heads"], num_key_value_heads=lm["kv_heads"],
                max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=ids["<pad>"],
                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"]).save_pretrained(folder)
    return folder


def train_config(s: dict, batch: int, compile: bool, cuda: bool):
    from indai.trainers.config import TrainConfig

    c, length = s["sensor"]
    return TrainConfig.model_validate({
        "recipe": "bench", "data": {"dataset": "bench-report", "loader": "memory"},
        "model": {"family": "report_writer", "flavour": s["flavour"], "lm": "bench-lm", "modalities": ["sensor", "image"],
                  "sensor": {"channels": c, "length": length}, "image": {"size": s["image"]},
                  "max_input_tokens": s["prompt"], "max_response_tokens": s["response"]},
        "optim": {"epochs": 1, "batch_size": batch, "lr": 1e-4, "clip": 1.0},
        "run": {"name": "bench-report", "launcher": "local", "compile": compile, "progress": False, "use_gpu": cuda}})


def host_batch(s: dict, batch: int, vocab: int, seed: int) -> dict:
    """A batch as the data module's `collate` makes it, in (pinned, on CUDA) host memory."""
    import torch

    from indai.trainers.models.report_writer.data import collate

    g = torch.Generator().manual_seed(seed)
    c, length = s["sensor"]
    items = [{"prompt": torch.randint(3, vocab, (s["prompt"],), generator=g).tolist(),
              "response": torch.randint(3, vocab, (s["response"],), generator=g).tolist(),
              "mask": torch.ones(3), "sensor": torch.randn(c, length, generator=g),
              "image": torch.rand(3, s["image"], s["image"], generator=g)} for _ in range(batch)]
    out = collate(items)
    if torch.cuda.is_available():
        out = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in out.items()}
    return out


def count_flops(step, grad_ckpt_off, grad_ckpt_on) -> tuple[int, int]:
    """(model FLOPs, counted FLOPs) of one training step, forward and backward, with gradient
    checkpointing off so that recomputation is not counted. The counter counts attention over the
    whole square and the flash backward's recomputation of the scores: 3.5 times the forward's
    full square in all. Model FLOPs count attention as llm_throughput.py does, causal: half the
    square, three times the forward (6 L S d per token)."""
    from torch.utils.flop_counter import FlopCounterMode

    grad_ckpt_off()
    try:
        with FlopCounterMode(display=False) as counter:
            step(update=False)
    finally:
        grad_ckpt_on()
    counts = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    attn_fwd = sum(n for op, n in counts.items() if "scaled_dot_product" in op and "backward" not in op)
    attn_bwd = sum(n for op, n in counts.items() if "scaled_dot_product" in op and "backward" in op)
    total = counter.get_total_flops()
    return total - attn_fwd - attn_bwd + 3 * attn_fwd // 2, total


def timed(step, warmup: int, steps: int, cuda: bool) -> tuple[float, float]:
    """(seconds of the warm-up, seconds per measured step)."""
    import torch

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return warm, (time.perf_counter() - t0) / steps


def profiled(step, cfg, device, steps: int) -> dict | None:
    """`steps` more steps under torch.profiler (trainers.profiling, as run.profile_steps records
    them): how busy the GPU was and the costliest operators; None when `steps` is 0."""
    if not steps:
        return None
    from indai.trainers.profiling import Profile

    run = cfg.run.model_copy(update={"timing_skip": 0, "profile_steps": steps})
    recorder = Profile(cfg.model_copy(update={"run": run}), 0, device)
    for _ in recorder.steps(range(steps)):
        step()
    return recorder.finish()


def run_lm_lora(s: dict, cfg, folder: Path, device, batch: int, a) -> dict:
    import torch

    from indai.trainers.models.report_writer.model import add_lora, hold_frozen_in_bf16, load_lm

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):  # random init where it runs: initialising 1.1B parameters on the CPU takes a while
        lm = load_lm(folder, load_weights=False)
    for p in lm.parameters():
        p.requires_grad_(False)
    ckpt = cfg.model.gradient_checkpointing
    if ckpt:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(lm, cfg.model).to(device)
    if cuda:
        hold_frozen_in_bf16(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda or None)
    prefix = cfg.model.sensor.tokens + cfg.model.image.tokens
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (batch, prefix + s["prompt"] + s["response"]), generator=g).to(device)
    labels = ids.clone()
    labels[:, : prefix + s["prompt"]] = -100

    def step(update: bool = True):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if update:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=cuda or None)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    on = (lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})) if ckpt else (lambda: None)
    flops, counted = count_flops(step, model.gradient_checkpointing_disable if ckpt else (lambda: None), on)
    warm, secs = timed(step, a.warmup, a.steps, cuda)
    return {"flops_per_step": flops, "counted_flops_per_step": counted, "warmup_s": warm, "step_s": secs,
            "profile": profiled(step, cfg, device, a.profile), "tokens_per_step": ids.numel(),
            "response_tokens_per_step": batch * s["response"], "trainable": sum(p.numel() for p in params),
            "final_loss": float(step().item())}


def run_indai(s: dict, cfg, folder: Path, device, batch: int, a) -> dict:
    import torch

    from indai.trainers.engine import build_engine
    from indai.trainers.loop import setup_distributed
    from indai.trainers.models.report_writer.data import to_device
    from indai.trainers.models.report_writer.model import ReportWriter, hold_frozen_in_bf16
    from indai.trainers.models.report_writer.train import _inputs

    cuda = device.type == "cuda"
    d = setup_distributed(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = ReportWriter(cfg.model, folder, load_pretrained=False).to(device)
    if cuda:  # as train_report_writer does on CUDA with bf16 (before the engine here: the FLOP count runs first)
        hold_frozen_in_bf16(model.lm)
    model.train()
    host = host_batch(s, batch, 300, seed=1)
    ckpt = cfg.model.gradient_checkpointing
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}

    # FLOPs of the eager model, before the engine compiles anything (the compiled step runs the same math)
    def eager_step(update: bool = False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = model(**_inputs(to_device(host, device)))
        loss.backward()
        model.zero_grad(set_to_none=True)

    flops, counted = count_flops(eager_step, model.lm.gradient_checkpointing_disable if ckpt else (lambda: None),
                                 (lambda: model.lm.gradient_checkpointing_enable(**kwargs)) if ckpt else (lambda: None))
    engine, _ = build_engine(model, cfg, d, lambda step: 1.0)
    last = {}

    def step():
        loss, n = engine(**_inputs(to_device(host, device)))
        engine.backward(loss)
        engine.step()
        last["loss"] = loss
        return loss

    warm, secs = timed(step, a.warmup, a.steps, cuda)
    prefix = cfg.model.sensor.tokens + cfg.model.image.tokens
    return {"flops_per_step": flops, "counted_flops_per_step": counted, "warmup_s": warm, "step_s": secs,
            "profile": profiled(step, cfg, device, a.profile), "tokens_per_step": batch * (prefix + s["prompt"] + s["response"]),
            "response_tokens_per_step": batch * s["response"], "strategy": engine.indai_strategy,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "final_loss": float(last["loss"].item())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="reference")
    ap.add_argument("--ways", choices=WAYS, nargs="+", default=list(WAYS))
    ap.add_argument("--batch", type=int, help="records per step (default: 8 with 120 GiB or more of GPU memory, else 4; 2 on CPU)")
    ap.add_argument("--steps", type=int, help="measured steps (default: the shape's)")
    ap.add_argument("--warmup", type=int, help="warm-up steps, compilation included (default: the shape's)")
    ap.add_argument("--grad-ckpt", choices=["flavour", "on", "off"], default="flavour",
                    help="gradient checkpointing of the LM (the base flavour has it on)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after the measured steps, STEPS more under torch.profiler: how busy the GPU was, the costliest operators")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    import torch

    from indai.trainers.profiling import describe

    s = SHAPES[a.shape]
    a.steps, a.warmup = a.steps or s["steps"], a.warmup if a.warmup is not None else s["warmup"]
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda:0" if cuda else "cpu")
    batch = a.batch or (2 if not cuda else 8 if torch.cuda.get_device_properties(device).total_memory >= 120 * 2**30 else 4)
    rows = []
    with tempfile.TemporaryDirectory(prefix="indai-bench-lm-") as tmp:
        folder = lm_folder(Path(tmp), s["lm"])
        for way in a.ways:
            cfg = train_config(s, batch, compile=way == "indai_compile", cuda=cuda)
            if a.grad_ckpt != "flavour":
                cfg.model.gradient_checkpointing = a.grad_ckpt == "on"
            t0 = time.perf_counter()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                r = (run_lm_lora if way == "lm_lora" else run_indai)(s, cfg, folder, device, batch, a)
            except torch.cuda.OutOfMemoryError as e:
                r = {"error": f"out of memory: {e}"[:300]}
            row = {"way": way, "shape": a.shape, "batch": batch, "prompt_tokens": s["prompt"], "response_tokens": s["response"],
                   "prefix_tokens": cfg.model.sensor.tokens + cfg.model.image.tokens,
                   "grad_ckpt": cfg.model.gradient_checkpointing, "lora_r": cfg.model.lora.r, "warmup_steps": a.warmup,
                   "measured_steps": a.steps, "device": str(device), "gpu": torch.cuda.get_device_name(device) if cuda else None,
                   "note": a.note}
            if "error" in r:
                row.update(r)
            else:
                secs = r["step_s"]
                row.update({"step_ms": round(1000 * secs, 2), "warmup_s": round(r["warmup_s"], 2),
                            "tokens_per_s": round(r["tokens_per_step"] / secs, 1),
                            "response_tokens_per_s": round(r["response_tokens_per_step"] / secs, 1),
                            "flops_per_step": r["flops_per_step"], "counted_flops_per_step": r["counted_flops_per_step"],
                            "tflops": round(r["flops_per_step"] / secs / 1e12, 3),
                            "mfu": round(r["flops_per_step"] / secs / PEAK_BF16, 4), "trainable": r["trainable"],
                            "strategy": r.get("strategy"), "final_loss": round(r["final_loss"], 4), "profile": r["profile"],
                            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None})
            rows.append(row)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            print(f"{way}: {row.get('tokens_per_s')} tokens/s, MFU {row.get('mfu')} ({time.perf_counter() - t0:.1f} s in all)",
                  file=sys.stderr, flush=True)
    base = next((r for r in rows if r["way"] == "lm_lora" and "error" not in r), None)
    for r in rows:
        if "error" not in r:
            r["ratio_to_lm_lora"] = round(r["tokens_per_s"] / base["tokens_per_s"], 4) if base else None
        write("report_writer_throughput", r)
    print(f"{'way':<15}{'batch':>6}{'tokens/s':>11}{'resp tok/s':>11}{'ms/step':>9}{'TFLOP/s':>9}{'MFU':>7}{'/lm_lora':>9}{'peak GiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['way']:<15}{r['batch']:>6}  {r['error'][:70]}")
            continue
        ratio = f"{r['ratio_to_lm_lora']:.3f}" if r["ratio_to_lm_lora"] is not None else "-"
        pk = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['way']:<15}{r['batch']:>6}{r['tokens_per_s']:>11.0f}{r['response_tokens_per_s']:>11.0f}{r['step_ms']:>9.1f}"
              f"{r['tflops']:>9.2f}{r['mfu']:>7.3f}{ratio:>9}{pk:>10}")
        if r["profile"]:
            print(f"{'':<15}profiled: {describe(r['profile'])}")


if __name__ == "__main__":
    main()
