"""Precision and recall of de-identification, per kind, on the constructed evaluation set.

It calls `indai.platform.deid.scan` (what a release uses) and `Deidentifier.text` (what a release
writes). A planted identifier is found when a detection of the same kind overlaps it; a detection
is correct when it overlaps a planted identifier of its kind. `leaked` counts planted values that
still appear, as a substring, in the de-identified text; `uncovered` counts planted identifiers of
which some character is left outside every detection (any kind).

    .venv/bin/python bench/deid_eval.py              # the committed set (seed 0) and a held-out seed 1
    .venv/bin/python bench/deid_eval.py --seeds 0 1 2 --show-misses
Appends one JSON line per evaluated set to bench/results/deid_eval.jsonl (via bench/_record.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _record import write  # noqa: E402
from make_deid_eval import build, load_config  # noqa: E402

from indai.platform.deid import KINDS, DeidConfig, Deidentifier, scan  # noqa: E402

DATA = HERE / "data" / "deid_eval.jsonl"
CONFIG = HERE / "data" / "deid_eval_config.yaml"
EVAL_SECRET = b"deid-eval-secret-not-a-real-member-key"


def load_set(path: Path = DATA) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_config(path: Path = CONFIG) -> DeidConfig:
    from indai.platform.config import load_config as load

    return load(DeidConfig, path)


def _overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


def evaluate(records: list[dict], config: DeidConfig, misses: list | None = None) -> dict:
    """Per-kind and overall precision/recall/F1, leaks and uncovered spans; `misses` collects examples."""
    gold_n = {k: 0 for k in KINDS}
    found_n = {k: 0 for k in KINDS}
    det_n = {k: 0 for k in KINDS}
    det_ok = {k: 0 for k in KINDS}
    leaked = {k: 0 for k in KINDS}
    uncovered = {k: 0 for k in KINDS}
    deid = Deidentifier(config, EVAL_SECRET)
    for rec in records:
        text, gold = rec["text"], rec["spans"]
        dets = scan(text, config)
        out = deid.text(text, rec.get("id", "?"))
        for g in gold:
            k = g["kind"]
            gold_n[k] += 1
            hit = any(d.kind == k and _overlaps(d.start, d.end, g["start"], g["end"]) for d in dets)
            found_n[k] += hit
            covered = set()
            for d in dets:
                covered.update(range(max(d.start, g["start"]), min(d.end, g["end"])))
            if len(covered) < g["end"] - g["start"]:
                uncovered[k] += 1
                if misses is not None:
                    misses.append(("uncovered", k, g["value"], text))
            if g["value"] in out:
                leaked[k] += 1
            if misses is not None and (not hit or g["value"] in out):
                misses.append(("miss" if not hit else "leak", k, g["value"], text))
        for d in dets:
            det_n[d.kind] += 1
            ok = any(g["kind"] == d.kind and _overlaps(d.start, d.end, g["start"], g["end"]) for g in gold)
            det_ok[d.kind] += ok
            if misses is not None and not ok:
                misses.append(("false", d.kind, text[d.start:d.end], text))

    def prf(tp_r: int, n_gold: int, tp_p: int, n_det: int) -> dict:
        r = tp_r / n_gold if n_gold else 1.0
        p = tp_p / n_det if n_det else 1.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4), "planted": n_gold, "detected": n_det}

    per_kind = {k: prf(found_n[k], gold_n[k], det_ok[k], det_n[k]) | {"leaked": leaked[k], "uncovered": uncovered[k]}
                for k in KINDS}
    overall = prf(sum(found_n.values()), sum(gold_n.values()), sum(det_ok.values()), sum(det_n.values()))
    overall |= {"leaked": sum(leaked.values()), "uncovered": sum(uncovered.values())}
    return {"sentences": len(records), "no_identifier_sentences": sum(1 for r in records if not r["spans"]),
            "per_kind": per_kind, "overall": overall}


def table(name: str, res: dict) -> str:
    rows = [f"{name}: {res['sentences']} sentences ({res['no_identifier_sentences']} without identifiers)",
            f"{'kind':<9} {'planted':>7} {'detected':>8} {'precision':>9} {'recall':>7} {'f1':>6} {'leaked':>6} {'uncovered':>9}"]
    for k, m in list(res["per_kind"].items()) + [("overall", res["overall"])]:
        rows.append(f"{k:<9} {m['planted']:>7} {m['detected']:>8} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} "
                    f"{m['leaked']:>6} {m['uncovered']:>9}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description="De-identification precision/recall per kind")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1], help="held-out sets generated in memory (besides the committed file)")
    ap.add_argument("--show-misses", action="store_true", help="print missed, leaked and false detections (constructed data only)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    config = eval_config()
    sets = [("bench/data/deid_eval.jsonl (seed 0)", load_set())]
    sets += [(f"generated seed {s} (held-out templates included)", build(s, load_config(CONFIG))) for s in a.seeds if s != 0]
    for name, records in sets:
        misses: list = []
        res = evaluate(records, config, misses)
        print(table(name, res) + "\n")
        if a.show_misses:
            for m in misses:
                print("  ", *m, sep=" | ")
        if not a.no_write:
            write("deid_eval", {"set": name} | res)   # date, commit, python and machine come with it


if __name__ == "__main__":
    main()
