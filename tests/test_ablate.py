"""`mcihn ablate`: several ablations' seeds trained and tabled in one command, resumable."""

from __future__ import annotations

import json

import pytest
from test_train import synthetic_set

from mcihn.data import save_feature_store
from tools.ablate import format_markdown, separation
from tools.cli import main


def test_ablate_tables_each_variant_against_the_first_and_resumes(tmp_path, capsys):
    store = save_feature_store(synthetic_set(), tmp_path / "store")
    out = tmp_path / "ablation"
    command = ["ablate", "--data", str(store), "--out", str(out), "--variants", "full,MCIHN-1", "--seeds", "2",
               "--epochs", "2", "--preset", "small"]
    assert main(command) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| MCIHN (2 seeds, test) | Acc-2 (has0)") and len(table) == 4
    assert table[2].startswith("| full | ") and "(+" not in table[2] and "(-" not in table[2]
    assert table[3].startswith("| MCIHN-1 | ")
    result = json.loads((out / "ablation.json").read_text())
    for variant in ("full", "MCIHN-1"):
        runs = json.loads((out / variant / "summary.json").read_text())["runs"]
        mae = [r["test"]["MAE"] for r in runs]
        assert result["rows"][variant]["MAE"][0] == pytest.approx(sum(mae) / 2)
    assert (out / "ablation.md").read_text().strip() == "\n".join(table)

    assert main(command) == 0  # rerun: each seed resumes from its finished state and gives the same table
    assert json.loads((out / "ablation.json").read_text())["rows"] == result["rows"]


def test_separation_is_the_mean_difference_in_pooled_std_units():
    assert separation([1.0, 3.0], [0.0, 2.0]) == pytest.approx(1.0 / 2 ** 0.5)  # both std sqrt(2)
    assert separation([1.0, 1.0], [1.0, 1.0]) == 0.0
    result = {"model": "M", "seeds": 2, "keys": ["MAE"], "variants": ["a", "b"],
              "rows": {"a": {"MAE": [0.5, 0.01, 0.0]}, "b": {"MAE": [0.6, 0.02, 6.3]}}}
    assert format_markdown(result).splitlines()[-1] == "| b | 0.600 ± 0.020 (+6.3) |"
