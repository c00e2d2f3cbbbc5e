"""llm.ipynb must be llm.py, cell for cell, and must carry its executed outputs and plots."""
import json

import jupytext

from conftest import ROOT

REGENERATE = ("jupytext --to ipynb --update llm.py && jupyter nbconvert --to notebook --execute "
              "--inplace --ExecutePreprocessor.record_timing=False llm.ipynb")


def cells(path):
    notebook = jupytext.read(path)
    return [(c.cell_type, c.source.strip(), c.metadata.get("tags", [])) for c in notebook.cells]


def test_notebook_cells_match_llm_py():
    source, notebook = cells(ROOT / "llm.py"), cells(ROOT / "llm.ipynb")
    for i, (a, b) in enumerate(zip(source, notebook)):
        assert a == b, f"cell {i} of llm.ipynb differs from llm.py; regenerate it with:\n  {REGENERATE}"
    assert len(source) == len(notebook), (f"llm.py has {len(source)} cells, llm.ipynb {len(notebook)}; "
                                          f"regenerate it with:\n  {REGENERATE}")


def committed_notebook():
    return json.loads((ROOT / "llm.ipynb").read_text(encoding="utf-8"))


def test_committed_notebook_was_executed_without_errors():
    code = [c for c in committed_notebook()["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in code), f"execute it with:\n  {REGENERATE}"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "cells were run out of order; re-execute from the top"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert errors == []


def test_committed_notebook_shows_each_plot_and_part_i_has_its_own():
    images_before_part_ii, in_part_ii = 0, False
    for i, cell in enumerate(committed_notebook()["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and source.startswith("# Part II: the appendices"):
            in_part_ii = True
        if cell["cell_type"] != "code":
            continue
        images = sum("image/png" in o.get("data", {}) for o in cell["outputs"])
        if any(line.strip().startswith("plt.show()") for line in source.splitlines()):
            assert images >= 1, f"cell {i} calls plt.show() but shows no image: {REGENERATE}"
        images_before_part_ii += 0 if in_part_ii else images
    assert in_part_ii, "no '# Part II: the appendices' heading"
    assert images_before_part_ii >= 2  # Part I's own plots, not only the appendices'
