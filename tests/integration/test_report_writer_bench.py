"""bench/report_writer_throughput.py, the report writer's GPU benchmark, and bench/checkpoint_size.py on CPU at their tiny shape:
the script the GPU machine runs (bench/gpu/run.sh) works end to end before a device minute is
spent on it, its FLOP count is the textbook one where that is known, and `run.compile` compiles
the report writer by regions (decoder layers and prefix encoders) and trains with it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_counted_flops_of_full_fine_tuning_are_the_lm_bench_s_6n_plus_causal_attention():
    """The MFU of the report-writer bench and of llm_throughput.py count the same FLOPs: on a
    full fine-tuning step of a Llama the count equals llm_throughput's 6 N + 6 L S d per token,
    exactly, and gradient checkpointing (recomputation) does not change it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import llm_throughput
    import report_writer_throughput as rwb

    s = dict(llm_throughput.SHAPES["tiny"], seq=48)
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, s["vocab"], (2, s["seq"]))
    # N: the weights that multiply (llm_throughput's N also counts the norms' few weights: 0.01 % at 1.1B)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))

    def step(update: bool = False):
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    model.gradient_checkpointing_enable(**kwargs)
    flops, counted = rwb.count_flops(step, model.gradient_checkpointing_disable,
                                     lambda: model.gradient_checkpointing_enable(**kwargs))
    assert model.is_gradient_checkpointing  # put back after counting
    assert flops == llm_throughput.flops_per_token("full", n_matmul, 0, s) * ids.numel()
    # the raw count: the whole square of scores, and the flash backward recomputes them (3.5 x the forward)
    attention_fwd_full = 4 * s["layers"] * s["seq"] * s["hidden"] * ids.numel()
    assert counted - flops == 2 * attention_fwd_full

def test_the_report_writer_bench_runs_its_three_ways_on_cpu(tmp_path):
    env = dict(os.environ, INDAI_BENCH_RESULTS=str(tmp_path), PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "bench/report_writer_throughput.py", "--shape", "tiny", "--grad-ckpt", "on",
                          "--profile", "2", "--note", "test"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[indai] compile: regions 2 x LlamaDecoderLayer, 2 x PrefixEncoder" in out.stderr
    rows = {r["way"]: r for r in map(json.loads, (tmp_path / "report_writer_throughput.jsonl").read_text().splitlines())}
    assert set(rows) == {"lm_lora", "indai", "indai_compile"}
    for r in rows.values():
        assert "error" not in r and r["grad_ckpt"] is True and r["note"] == "test"
        assert r["profile"]["steps"] == 2 and r["profile"]["device_busy"] is None and r["profile"]["top"]  # CPU: no kernels
        assert r["tokens_per_s"] > 0 and r["flops_per_step"] > 0 and torch.isfinite(torch.tensor(r["final_loss"]))
        assert r["mfu"] == pytest.approx(r["flops_per_step"] / (r["step_ms"] / 1000) / 989e12, rel=0.01, abs=1e-4)
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * (r["prefix_tokens"] + r["prompt_tokens"] + r["response_tokens"])
                                                  / (r["step_ms"] / 1000), rel=0.01)
    # the same model compiled counts the same FLOPs; the encoders add theirs to the bare LM's
    assert rows["indai_compile"]["flops_per_step"] == rows["indai"]["flops_per_step"] > rows["lm_lora"]["flops_per_step"]
    assert rows["indai"]["trainable"] > rows["lm_lora"]["trainable"]  # adapters + prefix encoders and projections
    assert rows["lm_lora"]["ratio_to_lm_lora"] == 1.0 and rows["indai"]["strategy"] == "ddp"
    table = out.stdout.splitlines()
    assert table[0].split()[:3] == ["way", "batch", "tokens/s"]
    assert [line.split()[0] for line in table[1:]] == [w for way in rows for w in (way, "profiled:")]


def test_the_checkpoint_bench_saves_and_loads_both_layouts(tmp_path):
    """bench/checkpoint_size.py: the checkpoint without the frozen LM is smaller by the LM's
    frozen weights, and both load back."""
    env = dict(os.environ, INDAI_BENCH_RESULTS=str(tmp_path))
    out = subprocess.run([sys.executable, "bench/checkpoint_size.py", "--shape", "tiny", "--repeats", "1", "--note", "test"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = map(json.loads, (tmp_path / "checkpoint_size.jsonl").read_text().splitlines())
    saved = row["every_weight_bytes"] - row["frozen_left_out_bytes"]
    # within 2 %: the file headers name the frozen tensors, the commit and engine.json carry their checksums
    assert row["frozen_bytes"] > 0 and 0.98 * row["frozen_bytes"] <= saved <= 1.02 * row["frozen_bytes"], row
    assert row["bytes_ratio"] == round(row["frozen_left_out_bytes"] / row["every_weight_bytes"], 5)
    assert row["save_ratio"] > 0 and row["load_ratio"] > 0 and "left out / every weight" in out.stdout
