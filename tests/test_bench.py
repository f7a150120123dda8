"""``usfmae-fast bench``: runs the selected suites and writes results with their provenance."""
import json

import pytest

from usfmae_fast.bench import SUITES, find_suites_dir, run_bench
from usfmae_fast.cli import main


@pytest.mark.slow
def test_bench_writes_results_summary_and_provenance(tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "--suites", "ops", "-k", "test_random_masking and eager and fwd",
                 "--out", str(out)])
    assert code == 0
    provenance = json.loads((out / "provenance.json").read_text())
    runs = {r["file"]: r for r in provenance["suites"]}
    assert set(runs) == set(SUITES["ops"])
    assert runs["bench_random_masking.py"]["status"] == "passed"
    # the selection matches nothing in the other two suites: reported, not failed
    assert runs["bench_mae_loss.py"]["status"] == "nothing ran"
    result = json.loads((out / "cpu_random_masking.json").read_text())
    assert result["benchmarks"] and all(b["params"]["variant"] == "eager"
                                        for b in result["benchmarks"])
    assert provenance["machine"]["device_type"] in ("cpu", "cuda")
    assert provenance["commit"] is None or len(provenance["commit"]) == 40
    summary = (out / "summary.md").read_text()
    assert "| random_masking |" in summary and "eager" in summary


def test_bench_rejects_unknown_suite_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="suites: unknown"):
        run_bench(["kernels"], tmp_path)
    with pytest.raises(FileNotFoundError, match="suites_dir"):
        find_suites_dir(tmp_path)
    assert main(["bench", "--suites", "ops", "--suites-dir", str(tmp_path)]) == 2


def test_bench_outside_a_checkout_says_what_it_needs(tmp_path, monkeypatch, capsys):
    import usfmae_fast.bench as bench

    installed = tmp_path / "site-packages" / "usfmae_fast"  # no benchmarks/ beside the package
    installed.mkdir(parents=True)
    monkeypatch.setattr(bench, "__file__", str(installed / "bench.py"))
    monkeypatch.chdir(tmp_path)
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "usfmae-fast bench:" in err and "checkout" in err and "--suites-dir" in err
    assert "pytest-benchmark" in err
