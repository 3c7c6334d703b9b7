#!/usr/bin/env python
"""Turn a training run into the weights that ship inside the package, with their fingerprint and model card.

    .venv/bin/python scripts/ship_weights.py runs/ship/checkpoint.pt            # name "tiny"
    .venv/bin/python scripts/ship_weights.py RUN/best.pt --name tiny --size 150 --eval-out runs/ship/card

1. Writes `unifuse/weights/unifuse-<name>.pt` (`UniFuse.save`: weights, config and facts about the run; no
   optimiser state), atomically.
2. Records `tests/shipped_fingerprint.json`: what `tests/test_shipped.py` checks the shipped model against.
3. Evaluates the model on held-out built-in pairs of each task at the spacing it was trained at (one whole head
   and one skull-stripped head per task, subjects never used in training), beside the naive average of the inputs
   and the staged classical baseline, and writes the tables into `unifuse/weights/MODEL_CARD.md` between the
   `<!-- results -->` markers (with --no-eval the card is left as it is).
"""
from __future__ import annotations
import argparse, datetime, importlib.util, json, os, platform, re, sys, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BRAIN_LABELS = (1, 2, 3, 6)   # csf, grey matter, white matter, lesion: what skull stripping keeps (as in training)


def _machine() -> str:
    cpu = platform.processor() or ""
    try: cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception: pass
    return f"{cpu or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def fingerprint(model) -> dict:
    spec = importlib.util.spec_from_file_location("test_shipped", ROOT / "tests" / "test_shipped.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod._fingerprint(model)


def cases(size:int, seed:int=7):
    "Held-out built-in pairs: per task one whole head and one skull-stripped head (subjects far from the training pool)."
    from unifuse.data import builtin_pair
    from unifuse.evaluate import make_case
    for t, task in enumerate(("mri", "ct", "pet")):
        for stripped in (False, True):
            s = seed * 100_000 + 70_000 + 100 * t + int(stripped)
            p = builtin_pair(task, seed=s, size=size)
            if stripped:
                brain = torch.zeros_like(p["labels"], dtype=torch.bool)
                for k in BRAIN_LABELS: brain |= p["labels"] == k
                p = {**p, "ref": p["ref"] * brain, "other": p["other"] * brain, "id": p["id"] + "-stripped"}
            yield make_case(p, seed=s)


def fuse_method(model, classes:list, window="auto", prealign:bool=False):
    """UniFuse as `unifuse-fuse` runs it: by default (`window="auto"`: windows of the training crop after a whole-volume
    alignment, for heads beyond 1.5× the crop), or in one pass (`window=0`), optionally after the rigid pre-alignment;
    appends (case id, expected class, predicted class, p) to `classes`."""
    from unifuse.fuse import fuse_prealigned, degradation_report
    def m(case):
        t0 = time.perf_counter()
        o = fuse_prealigned(model, case["ref"], case["deg"], "rigid" if prealign else "none", window=window, overlap=0.25)
        rep = degradation_report(o["probs"][0], case["task"])
        classes.append((case["id"], rep["expected"], rep["cls"], rep["probability"]))
        return o["fused"].float().cpu(), o["flow"].float(), time.perf_counter() - t0
    return m


def evaluate_model(model, size:int, out:Path) -> dict:
    from unifuse.evaluate import baseline_methods, evaluate, write_evaluation
    classes = {"auto": [], "whole": [], "rigid": []}
    methods = {"UniFuse (shipped)": fuse_method(model, classes["auto"]),
               "UniFuse, one pass": fuse_method(model, classes["whole"], window=0),
               "Rigid + UniFuse": fuse_method(model, classes["rigid"], prealign=True)}
    methods.update(baseline_methods(("average", "pyramid")))
    t0 = time.time()
    res = evaluate(list(cases(size)), methods, progress=True)
    write_evaluation(res, out, {"dataset": "builtin (held out)", "size": size, "methods": list(methods)})
    return dict(res=res, seconds=time.time() - t0, classes=classes)


def class_table(classes:dict) -> str:
    "Predicted degradation class (and p) per case: the default (windows) against one pass over the whole volume."
    rows = ["| case | expected | default (windows) | one pass |", "|---|---|---|---|"]
    for (cid, exp, c1, p1), (_, _, c2, p2) in zip(classes["auto"], classes["whole"]):
        rows.append(f"| {cid} | {exp} | {c1} ({p1:.2f}) | {c2} ({p2:.2f}) |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="a training checkpoint (checkpoint.pt / best.pt) or a UniFuse.save file")
    ap.add_argument("--name", default="tiny", help="shipped name: unifuse/weights/unifuse-NAME.pt (default tiny)")
    ap.add_argument("--size", type=int, default=150, help="voxels per side of the held-out heads (150 = 1.49 mm, as trained)")
    ap.add_argument("--eval-out", type=Path, default=None, help="folder for the evaluation tables (default: beside the checkpoint)")
    ap.add_argument("--no-eval", action="store_true", help="only write the weights and the fingerprint")
    a = ap.parse_args(argv)
    from unifuse.model import UniFuse
    model = UniFuse.load(a.checkpoint).eval()
    ck = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
    tr = ck.get("train") or {}
    meta = dict(model.meta)
    meta.update(name=a.name, data="built-in synthetic heads (unifuse.data, from nilearn's MNI152 2009 templates)",
                wall_time_s=round(float(tr.get("elapsed_s", 0.0))), machine=_machine(),
                shipped=datetime.date.today().isoformat(), torch_version=str(torch.__version__))
    dest = ROOT / "unifuse" / "weights" / f"unifuse-{a.name}.pt"
    UniFuse.save(model, dest, meta)
    print(f"wrote {dest.relative_to(ROOT)} ({dest.stat().st_size / 1e6:.2f} MB): {meta}")
    if a.name == "tiny":
        fp = fingerprint(UniFuse.load(dest))
        (ROOT / "tests" / "shipped_fingerprint.json").write_text(json.dumps(fp, indent=1) + "\n")
        print("wrote tests/shipped_fingerprint.json")
    if a.no_eval: return
    out = a.eval_out or a.checkpoint.parent / "card"
    r = evaluate_model(UniFuse.load(dest).eval(), a.size, out)
    card = ROOT / "unifuse" / "weights" / "MODEL_CARD.md"
    from unifuse.evaluate import summarise, markdown_table, FUSION_COLS, ALIGN_COLS
    per_task = []
    for t in ("mri", "ct", "pet"):
        s = summarise([c for c in r["res"]["cases"] if c["task"] == t])
        per_task += [markdown_table(s, FUSION_COLS, f"Fusion, {t}"), markdown_table(s, ALIGN_COLS, f"Alignment, {t}")]
    fus, ali = "\n\n".join(per_task), (out / "alignment.md").read_text().strip()
    block = (f"<!-- results -->\nMeasured by `python scripts/ship_weights.py {a.checkpoint.name}` on {meta['shipped']}: six held-out "
             f"built-in heads ({a.size}³ at {224 / a.size:.2f} mm; per task one whole head and one skull-stripped), "
             f"two cases of each task (mean ± std); scored against the clean aligned sources. {r['seconds']:.0f} s on "
             f"{meta['machine']}. UniFuse (shipped): `unifuse-fuse`'s default, windows of the training crop (overlap 0.25) "
             f"after a whole-volume alignment by FA's MIND-affine prior; UniFuse, one pass: the whole volume at once "
             f"(`--window 0`); Rigid + UniFuse: the default after the rigid pre-alignment (`--prealign rigid`).\n\n{fus}\n\n{ali.replace('**Alignment**', '**Alignment, all six cases**')}"
             f"\n\n**Predicted degradation class** (probability)\n\n{class_table(r['classes'])}\n<!-- /results -->")
    text = card.read_text() if card.exists() else "<!-- results -->\n<!-- /results -->\n"
    text = re.sub(r"<!-- results -->.*<!-- /results -->", lambda m: block, text, flags=re.S)
    card.write_text(text)
    print(f"wrote {card.relative_to(ROOT)} and {out}")


if __name__ == "__main__":
    main()
