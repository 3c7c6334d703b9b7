#!/usr/bin/env python
"""Re-record the outputs of notebooks in place, the way a learner runs them in JupyterLab.

    .venv/bin/python scripts/run_nb.py nbs/50_model.ipynb [more.ipynb ...] [--flags slow cuda] [--timeout 1800]

Cells flagged with a test flag (`#| slow`, `#| cuda`) are skipped and keep their recorded outputs unless
`--flags` names the flag; every other cell runs in order in one fresh kernel started in `nbs/`. A failing
cell stops the run and leaves the notebook file untouched. Afterwards run `.venv/bin/nbdev-clean`.
Record timings only on an idle machine. The kernel draws with the inline backend whatever `MPLBACKEND` says
(scripts/test.sh sets Agg, under which `plt.show()` records nothing), and a run in which a cell that draws a
figure (`plt.show()`, or a Figure as its value) records no picture fails.
"""
import argparse, os, re, sys, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient

FLAG = re.compile(r"^#\|\s*(\w+)\s*$")


def flags_of(cell) -> set:
    "Test flags (`#| slow`, `#| cuda`) at the top of a code cell."
    out = set()
    for line in cell.source.splitlines():
        if not line.startswith("#|"): break
        m = FLAG.match(line.strip())
        if m: out.add(m.group(1))
    return out


def run(path:Path, flags:set, timeout:int, known=("slow", "cuda")) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    with client.setup_kernel(env=env):
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code": continue
            skip = (flags_of(cell) & set(known)) - flags
            if skip: continue
            t = time.time()
            client.execute_cell(cell, i)
            dt = time.time() - t
            if dt > 5: print(f"  {path.name} cell {i}: {dt:.1f} s", file=sys.stderr)
    drop_dead_widget_views(nb)
    skipped = {i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (flags_of(c) & set(known)) - flags}
    blank = [i for i in blank_figures(nb) if i not in skipped]          # skipped cells keep their recorded outputs
    if blank: raise SystemExit(f"{path}: cells {blank} draw a figure but recorded no picture; notebook left as it was")
    nbformat.write(nb, path)
    return time.time() - t0


def blank_figures(nb) -> list:
    "Indices of code cells that draw a figure whose outputs hold no picture of it (the Figure only as text, or `plt.show()` with no PNG)."
    out = []
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] != "code": continue
        outs = c.get("outputs", [])
        pictures = ["image/png" in o.get("data", {}) for o in outs]
        texts = ["".join(o.get("data", {}).get("text/plain", "")) for o in outs]
        as_text = any(t.startswith("<Figure size") or t.startswith("<IPython.core.display.Image object")
                      for t, pic in zip(texts, pictures) if not pic)
        shown = "plt.show()" in "".join(c["source"]) and not any(pictures)
        if as_text or shown: out.append(i)
    return out


def drop_dead_widget_views(nb) -> int:
    """Remove widget views from recorded outputs that also hold a picture: widget state is never saved, so in
    JupyterLab a saved view can only say "model not found", while the PNG beside it shows what the widget drew."""
    n = 0
    for c in nb.cells:
        for o in c.get("outputs", []):
            d = o.get("data", {})
            if "application/vnd.jupyter.widget-view+json" in d and "image/png" in d:
                del d["application/vnd.jupyter.widget-view+json"]; n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--flags", nargs="*", default=[], help="also run cells with these flags (e.g. slow)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    a = ap.parse_args(argv)
    for p in a.notebooks:
        dt = run(p, set(a.flags), a.timeout)
        print(f"{p}: {dt:.1f} s")


if __name__ == "__main__":
    main()
