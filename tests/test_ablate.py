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


def test_compare_rows_and_targets_make_one_table_with_every_row(tmp_path, capsys):
    """`mcihn compare --rows ... --target a,b`: every row and the logistic regression on each target, one table;
    each row's seeds under OUT/TARGET/MODEL[-ABLATION]; a rerun resumes and gives the same table."""
    store = save_feature_store(synthetic_set(), tmp_path / "store")
    out = tmp_path / "table"
    command = ["compare", "--rows", "mcn-cl,mcn-cl:no-mining,mcihn:MCIHN-1", "--target", "acc2-has0,acc7",
               "--data", str(store), "--out", str(out), "--seeds", "2", "--epochs", "1", "--preset", "small"]
    assert main(command) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = lines[0]
    assert header.startswith("| model | acc2-has0 weighted F1 | acc2-has0 accuracy |") and "acc7 macro F1" in header
    names = [line.split(" | ")[0] for line in lines[1:5]]  # lines[0] the header (the |---| line has no space)
    assert names == ["| MCN-CL-small (2 seeds)", "| MCN-CL-small no-mining (2 seeds)", "| MCIHN-1-small (2 seeds)",
                     "| logistic regression, mean-pooled (L2 " + names[3].split("(L2 ")[-1]]
    assert all(line.count(" ± ") == 6 for line in lines[1:4])  # two targets x three metrics, mean ± std
    assert lines[2].count(" (+") + lines[2].count(" (-") == 2 and "(+" not in lines[1] and "(-" not in lines[1]
    result = json.loads((out / "compare.json").read_text())
    assert [c["label"] for c in result["columns"]] == ["acc2-has0", "acc7"]
    for target in ("acc2-has0", "acc7"):
        for folder in ("mcn-cl", "mcn-cl-no-mining", "mcihn-MCIHN-1"):
            summary = json.loads((out / target / folder / "summary.json").read_text())
            assert len(summary["runs"]) == 2 and summary["dataset"].endswith(target)
            assert (out / target / folder / "seed_1" / "config.json").exists()
    acc7 = result["columns"][1]
    runs = json.loads((out / "acc7" / "mcn-cl-no-mining" / "summary.json").read_text())["runs"]
    assert acc7["rows"][1]["test"]["Acc"][0] == pytest.approx(sum(r["test"]["Acc"] for r in runs) / 2)
    assert main(command) == 0  # resumed: the same table
    assert capsys.readouterr().out == table


def test_compare_export_needs_one_row(tmp_path, capsys):
    store = save_feature_store(synthetic_set(), tmp_path / "store")
    assert main(["compare", "--rows", "mcn-cl,mcihn", "--target", "acc7", "--data", str(store), "--out",
                 str(tmp_path / "t"), "--export", str(tmp_path / "ship")]) == 2
    assert "--export ships the one row" in capsys.readouterr().err


def test_compare_data_list_gives_one_column_per_feature_set(tmp_path, capsys):
    """`--data A,B` (features without and with dialogue context, say): the rows and the logistic regression on
    each, under OUT/<folder name>/<row>; the same names twice are refused."""
    from test_train import synthetic_classes

    first = save_feature_store(synthetic_classes(), tmp_path / "plain")
    second = save_feature_store(synthetic_classes(), tmp_path / "context")
    out = tmp_path / "table"
    assert main(["compare", "--rows", "mcn-cl", "--data", f"{first},{second}", "--out", str(out), "--seeds", "1",
                 "--epochs", "1", "--preset", "small"]) == 0
    header = capsys.readouterr().out.splitlines()[2]
    assert header.startswith("| model | plain weighted F1 |") and "| context weighted F1 |" in header
    assert (out / "plain" / "mcn-cl" / "seed_0" / "config.json").exists()
    assert (out / "context" / "mcn-cl" / "seed_0" / "config.json").exists()
    assert [c["label"] for c in json.loads((out / "compare.json").read_text())["columns"]] == ["plain", "context"]
    assert main(["compare", "--rows", "mcn-cl", "--data", f"{first},{first}", "--out", str(out)]) == 2
    assert "must differ" in capsys.readouterr().err
