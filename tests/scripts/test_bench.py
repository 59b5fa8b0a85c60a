"""The benchmark runner (scripts/bench.py) end to end on its smallest grid: every section runs and
writes numbers. Timings are never asserted: they belong to the machine, not to the code."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("extract", "sweep", "sweep-cli", "generate", "memory", "scaling")


@pytest.mark.slow
def test_quick_tiny_run_writes_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", "--shape", "tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== extract" in proc.stdout  # progress lines as it goes
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("date", "cpu", "cores", "torch", "device"):
        assert results["machine"][key] not in (None, "")
    assert set(results["sections"]) == set(SECTIONS)
    for name, section in results["sections"].items():
        assert "error" not in section, (name, section)
        assert section["rows"], name
        for row in section["rows"]:
            assert math.isfinite(row["value"]), (name, row)
            assert row["ratio"] is None or math.isfinite(row["ratio"]), (name, row)
        assert any(row["ratio"] is not None for row in section["rows"]) or name == "scaling", name
    extract = {r["measure"]: r for r in results["sections"]["extract"]["rows"]}
    assert extract["max |caa - naive| (layers before the last)"]["value"] < 1e-4
    sweep = [r for r in results["sections"]["sweep"]["rows"] if "max |fast - per-cell|" in r["measure"]]
    assert len(sweep) == 2 and all(r["value"] < 1e-4 for r in sweep)  # A/B and free-form
    generate = [r["measure"] for r in results["sections"]["generate"]["rows"]]
    assert "batch 1: steered" in generate and "batch 32: steered" in generate
    assert len(results["sections"]["scaling"]["series"]) == 6
    markdown = (tmp_path / "results.md").read_text()
    assert "## Summary" in markdown and all(f"## {name}" in markdown for name in SECTIONS)
    assert results["unfinished"] == [] and "Unfinished" not in markdown
    # a run in a subdirectory (another device or shape) is listed on the main page, a broken file is not
    import bench_report

    (tmp_path / "cuda-tiny").mkdir()
    (tmp_path / "cuda-tiny" / "results.json").write_text(json.dumps(results))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{")
    results["unfinished"] = ["scaling"]
    bench_report.write(results, tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    assert "## Other runs" in markdown and "[cuda-tiny](cuda-tiny/results.md)" in markdown
    assert "broken" not in markdown and "the run stopped before scaling" in markdown
    assert markdown.count("| extract | caa extract |") == 2  # its summary and the other run's


def test_default_output_directory_per_device_and_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench import parse_args

    assert parse_args([]).out == ROOT / "bench"
    assert parse_args(["--shape", "tiny"]).out == ROOT / "bench" / "cpu-tiny"
    assert parse_args(["--out", "/tmp/x"]).out == Path("/tmp/x")
    with pytest.raises(SystemExit):
        parse_args(["--shape", "smollm2", "--tokenizer", "/tmp"])


def test_loglog_exponent_recovers_a_power_law(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench_common import loglog_exponent

    xs = [16, 32, 64, 128]
    assert loglog_exponent(xs, [3.0 * x**1.5 for x in xs]) == pytest.approx(1.5)


def _run(command: str, sections: dict[str, float], shape: str = "smollm2") -> dict:
    """A results dict as bench.py writes it, one headline row per section (value: ``sections``)."""
    rows = {
        name: {
            "title": name,
            "setup": f"{name} setup",
            "rows": [{"measure": "m", "value": v, "unit": "s", "vs": None, "ratio": v, "headline": True}],
            "notes": [],
            "series": {},
            "seconds": 1.0,
        }
        for name, v in sections.items()
    }
    machine = {"date": command, "cpu": "c", "cores": 2, "cores_available": 2, "torch_threads": 2}
    machine |= {"memory_gib": 1, "platform": "p", "python": "3", "torch": "t", "transformers": "t"}
    machine |= {"caa": "0", "load_average": 1.5, "device": "cpu"}
    options = {
        "command": command,
        "device": "cpu",
        "shape": shape,
        "quick": False,
        "sections": list(sections),
    }
    return {"options": options, "machine": machine, "model": "M", "sections": rows, "total_seconds": 60}


def test_an_only_run_replaces_its_sections_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_report

    from bench import SECTIONS as ORDER

    bench_report.write(_run("full", {"extract": 1.0, "serve": 2.0, "generate": 3.0}), tmp_path)
    again = _run("only serve", {"serve": 5.0})
    kept = bench_report.earlier(tmp_path, again)
    assert set(kept) == {"extract", "generate"} and kept["extract"]["from"]["command"] == "full"
    merged = bench_report.merged(again, kept, list(ORDER))
    assert list(merged["sections"]) == ["extract", "generate", "serve"]  # the runner's order
    assert merged["sections"]["serve"]["rows"][0]["value"] == 5.0
    bench_report.write(merged, tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.count("From an earlier run: `full`") == 2 and "| serve | m | 5.00 s |" in markdown
    # a kept section keeps naming the run that measured it; another grid keeps nothing
    third = _run("only generate", {"generate": 4.0})
    assert bench_report.earlier(tmp_path, third)["extract"]["from"]["command"] == "full"
    assert bench_report.earlier(tmp_path, _run("tiny", {"serve": 1.0}, shape="tiny")) == {}


def test_serve_runs_by_default_only_on_the_cpu_with_smollm2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench import parse_args

    assert "serve" in parse_args([]).only
    assert "serve" not in parse_args(["--shape", "tiny"]).only
    assert parse_args(["--shape", "tiny", "--only", "serve"]).only == ["serve"]
