"""What one checkpoint of the report writer costs: bytes in the store and seconds to save it and to
load it back (a resume), with the frozen parameters left out (trainers.checkpoint: what a run
writes today) against every weight saved (the layout before, still what a checkpoint without a
frozen-parameter record holds). Same model, same engine, same store, one process, rounds
alternating; the ratios are the median of the ratios within a round.

The model is the report writer of report_writer_throughput.py's shapes: `reference` is the ~1.1B
Llama-shaped LM under LoRA with its sensor and image prefix encoders (random init, held in fp32
on the CPU, in bf16 on a GPU as training holds it); `tiny` is the debug flavour. The store is a
local folder, so the seconds are a local disk's; through MinIO on the cluster every byte also
crosses the network.

    .venv/bin/python bench/checkpoint_size.py [--shape reference|tiny] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report_writer_throughput as rw  # noqa: E402
from _record import write  # noqa: E402


def folder_bytes(store, prefix: str) -> int:
    return sum(f.stat().st_size for f in (store.root / prefix).rglob("*") if f.is_file())


def save_every_weight(engine, store, run: str, tag: str, meta: dict) -> None:
    """The checkpoint as it was written before frozen parameters were left out."""
    from indai.trainers import checkpoint

    with tempfile.TemporaryDirectory(prefix="indai-ckpt-") as local:
        engine.save_checkpoint(local, tag=tag, client_state=meta, exclude_frozen_parameters=False)
        store.upload_dir(f"{checkpoint.prefix(run)}/{tag}", Path(local) / tag)
    store.commit(f"{checkpoint.prefix(run)}/{tag}", {**meta, "strategy": engine.indai_strategy})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(rw.SHAPES), default="reference")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    import torch

    from indai.platform.storage import open_store
    from indai.trainers import checkpoint
    from indai.trainers.engine import build_engine
    from indai.trainers.loop import setup_distributed
    from indai.trainers.models.report_writer.model import ReportWriter, hold_frozen_in_bf16

    s = rw.SHAPES[a.shape]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    with tempfile.TemporaryDirectory(prefix="indai-bench-ckpt-") as tmp:
        t0 = time.perf_counter()
        folder = rw.lm_folder(Path(tmp) / "lm", s["lm"])
        cfg = rw.train_config(s, 1, compile=False, cuda=cuda)
        d = setup_distributed(cfg)
        torch.manual_seed(0)
        with torch.device(device):
            model = ReportWriter(cfg.model, folder, load_pretrained=False).to(device)
        if cuda:
            hold_frozen_in_bf16(model.lm)
        engine, _ = build_engine(model, cfg, d, lambda step: 1.0)
        for p in model.parameters():  # one optimizer step, so the checkpoint carries AdamW's state
            if p.requires_grad:
                p.grad = torch.full_like(p, 1e-3)
        engine.step()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        print(f"built the {a.shape} report writer: {total / 1e6:.1f} M parameters, {trainable / 1e6:.2f} M train "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)

        store = open_store(Path(tmp) / "store")
        ways = {"frozen_left_out": lambda tag, meta: checkpoint.save(engine, store, "bench", tag, meta, 0),
                "every_weight": lambda tag, meta: save_every_weight(engine, store, "bench", tag, meta)}
        runs: dict[str, list[dict]] = {w: [] for w in ways}
        for rnd in range(a.repeats):
            for way, save in ways.items():
                tag = checkpoint.epoch_tag(rnd)
                meta = {"epoch": rnd, "step": rnd + 1}
                t0 = time.perf_counter()
                save(tag, meta)
                saved = time.perf_counter() - t0
                size = folder_bytes(store, f"checkpoints/bench/{tag}")
                t0 = time.perf_counter()
                state = checkpoint.load(engine, store, "bench", tag)
                loaded = time.perf_counter() - t0
                assert state["step"] == rnd + 1
                store.delete_prefix(f"checkpoints/bench/{tag}")
                runs[way].append({"bytes": size, "save_s": saved, "load_s": loaded})
                print(f"{way} (round {rnd + 1}): {size / 2**20:,.1f} MiB, save {saved:.2f} s, load {loaded:.2f} s",
                      file=sys.stderr, flush=True)

    def ratio(key: str) -> float:
        return statistics.median(n[key] / o[key] for n, o in zip(runs["frozen_left_out"], runs["every_weight"]))

    row = {"shape": a.shape, "device": str(device), "parameters": total, "trainable": trainable,
           "frozen_bytes": frozen_bytes, "rounds": a.repeats,
           **{f"{way}_{k}": round(statistics.median(r[k] for r in rs), 3 if k != "bytes" else None)
              for way, rs in runs.items() for k in ("bytes", "save_s", "load_s")},
           "bytes_ratio": round(ratio("bytes"), 5), "save_ratio": round(ratio("save_s"), 4),
           "load_ratio": round(ratio("load_s"), 4), "note": a.note}
    write("checkpoint_size", row)
    print(f"{'way':<17}{'MiB':>11}{'save s':>9}{'load s':>9}")
    for way in runs:
        print(f"{way:<17}{row[f'{way}_bytes'] / 2**20:>11,.1f}{row[f'{way}_save_s']:>9.2f}{row[f'{way}_load_s']:>9.2f}")
    print(f"left out / every weight: bytes {row['bytes_ratio']:.4f}, save {row['save_ratio']:.3f}, load {row['load_ratio']:.3f}")


if __name__ == "__main__":
    main()
