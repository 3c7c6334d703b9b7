"""Every figure a notebook draws is saved with it as a picture, so a reader of the saved notebook sees it.

A notebook run with a non-interactive matplotlib backend (e.g. `MPLBACKEND=Agg`) records a Figure only as the text
`<Figure size …>` and `plt.show()` as nothing; `scripts/run_nb.py` re-records notebooks the way JupyterLab shows them."""
import importlib.util, json
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("run_nb", ROOT / "scripts" / "run_nb.py")   # one rule: the recorder's
run_nb = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(run_nb)
blank_figures = run_nb.blank_figures


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
