"""Every figure a notebook draws is saved with it as a picture, so a reader of the saved notebook sees it.

A notebook run with a non-interactive matplotlib backend (e.g. `MPLBACKEND=Agg`) records a Figure only as the text
`<Figure size …>` and `plt.show()` as nothing; `scripts/run_nb.py` re-records notebooks the way JupyterLab shows them."""
import json
from pathlib import Path
import pytest

NBS = sorted((Path(__file__).resolve().parents[1] / "nbs").glob("*.ipynb"))


def blank_figures(nb:dict) -> list:
    "Indices of code cells that draw a figure whose saved outputs hold no picture of it."
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


def test_blank_figures_finds_a_figure_saved_as_text():
    cell = lambda outs, src="fig": dict(cell_type="code", source=[src], outputs=outs)
    text = dict(output_type="execute_result", data={"text/plain": "<Figure size 640x480 with 1 Axes>"})
    pic = dict(output_type="display_data", data={"text/plain": "<Figure size 640x480 with 1 Axes>", "image/png": "iVBOR"})
    nb = dict(cells=[cell([text]), cell([pic]), cell([], "plt.plot([1]); plt.show()"), cell([pic], "plt.show()"),
                     dict(cell_type="markdown", source=["plt.show()"])])
    assert blank_figures(nb) == [0, 2]


@pytest.mark.parametrize("path", NBS, ids=lambda p: p.stem)
def test_every_figure_is_saved_as_a_picture(path):
    blank = blank_figures(json.loads(path.read_text(encoding="utf-8")))
    assert not blank, (f"{path.name}: code cells {blank} draw a figure but the saved notebook holds no picture of it; "
                       f"re-record it with `python scripts/run_nb.py {path.relative_to(path.parents[1])}` (inline backend)")
