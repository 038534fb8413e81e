"""The results contract's mean row and logged means: every model over the same sites."""

import pytest

from iopfl_lightning.modules.evaluation import means_by_model
from iopfl_lightning.results import model_means, rows_to_markdown, shared_sites


def _rows(with_outside: bool) -> list[dict]:
    """Two inside sites (global 0.80, personalized 0.82) and, held out, UCL: global only."""
    rows = [{"site": s, "model": m, "dice": d, "hd95": h, "cases": 1}
            for s in ("BIDMC", "HK") for m, d, h in (("global", 0.80, 2.0), ("personalized", 0.82, 1.9))]
    if with_outside:
        rows.append({"site": "UCL", "model": "global", "dice": 0.20, "hd95": 30.0, "cases": 1})
    return rows


def test_means_compare_models_on_the_sites_all_were_scored_on():
    rows = _rows(with_outside=True)
    assert shared_sites(rows) == ["BIDMC", "HK"]
    means = model_means(rows)
    assert means["global"]["dice"] == pytest.approx(0.80)  # not 0.60 with UCL mixed in
    assert means["personalized"]["dice"] == pytest.approx(0.82)
    logged = means_by_model(rows)
    assert float(logged["global/dice_mean"]) == pytest.approx(0.80)
    table = rows_to_markdown(rows)
    assert "| UCL | 0.2000 | 30.00 | - | - |" in table  # the held-out site keeps its own row
    assert "| **mean over BIDMC, HK** | **0.8000** | **2.00** | **0.8200** | **1.90** |" in table


def test_mean_row_is_plain_when_every_site_has_every_model():
    table = rows_to_markdown(_rows(with_outside=False))
    assert "| **mean** | **0.8000** | **2.00** | **0.8200** | **1.90** |" in table
