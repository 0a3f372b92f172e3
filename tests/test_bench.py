"""benchmarks/bench.py on the small synthetic set: one repetition, two models, ALS with one setting."""
import json
from pathlib import Path

import pytest

from benchmarks import bench
from pipeline import config, evaluate

OVERRIDES = ["train.epochs=2", "train.user_dim=8", "train.item_dim=8", "train.hidden=[16]"]


def test_bench_reports_what_evaluate_measures(spark, small_mf, tmp_path):
    _, base = small_mf
    result = bench.bench_dataset(spark, "tiny", None, OVERRIDES, str(base / "data"), ["mf", "two_tower"],
                                 [(4, 0.1, 5)], 1, str(tmp_path / "work"))
    result.update(command="bench test", machine="test machine", date="today", seconds=0.0)
    out, readme = tmp_path / "BENCHMARKS.md", tmp_path / "README.md"
    readme.write_text(f"# Title\n{bench.README_START}\nold table\n{bench.README_END}\nafter\n")
    bench.publish(result, out, readme)

    text = out.read_text()
    assert "## tiny" in text
    assert "| ALS | rank 4, regParam 0.1, maxIter 5 |" in text
    assert "| mf |" in text and "| two_tower |" in text
    assert "synth-20m was not run" in text
    assert (tmp_path / "benchmarks" / "rmse_vs_time.png").stat().st_size > 0
    summary = readme.read_text()
    assert summary.startswith("# Title\n") and summary.endswith(f"{bench.README_END}\nafter\n")
    assert "old table" not in summary and "| tiny | mf |" in summary and "synth-20m was not run" in summary
    als = result["rows"][0]
    assert 0 < als["rmse"] < 2 and 0 <= als["ndcg"] <= 1 and 0 <= als["recall"] <= 1
    mf = result["rows"][1]
    check = evaluate.evaluate(spark, config.load(overrides=OVERRIDES), mf["model_dir"], None, str(tmp_path / "check"))
    assert mf["rmse"] == pytest.approx(check["rating"]["rmse"], abs=1e-5)
    assert mf["ndcg"] == pytest.approx(check["ranking"]["ndcg@10"], abs=1e-5)
    assert mf["recall"] == pytest.approx(check["ranking"]["recall@10"], abs=1e-5)


def test_the_readme_summary_is_the_benchmark_table():
    """The README's results section is what bench.py writes from docs/benchmarks/bench-results.json."""
    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "docs" / "benchmarks" / "bench-results.json").read_text())
    readme = (root / "README.md").read_text()
    assert bench.with_summary(readme, results) == readme


def test_a_readme_without_the_markers_is_refused():
    with pytest.raises(ValueError, match="lacks the markers"):
        bench.with_summary("# no markers\n", {})
