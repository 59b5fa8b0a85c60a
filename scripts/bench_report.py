"""The benchmark's report: the machine it ran on, and results.json / results.md from the sections."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine(device: str) -> dict[str, Any]:
    import transformers

    import caa

    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "caa": caa.__version__,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": device,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def number(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 1e-3:
        return f"{v:.3f}"
    return f"{v:.1e}"


def _row(r: dict[str, Any], stage: str | None = None) -> str:
    ratio = "" if r["ratio"] is None else f"**{r['ratio']:.3g}x**" if r["headline"] else f"{r['ratio']:.3g}x"
    cells = [stage] if stage is not None else []
    cells += [r["measure"], f"{number(r['value'])} {r['unit']}", r["vs"] or "", ratio]
    return "| " + " | ".join(cells) + " |"


def markdown(results: dict[str, Any], others: dict[str, Any] | None = None) -> str:
    """The page of one run; ``others``: the runs whose summaries follow its own (see other_runs)."""
    m, o = results["machine"], results["options"]
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if "gpu" in m else "none used"
    lines = [
        "# caa benchmarks",
        "",
        f"Written by `{o['command']}` on {m['date']} in {results['total_seconds'] / 60:.1f} min. "
        "Every ratio compares two measurements taken in one run, on this machine"
        + (
            " (a section kept from an earlier run of the same grid says so)."
            if any(s.get("from") for s in results["sections"].values())
            else "."
        ),
        "",
        f"- **Model:** {results['model']}",
        f"- **Machine:** {m['cpu']}, {m['cores_available']} of {m['cores']} cores "
        f"({m['torch_threads']} torch threads), {m['memory_gib']} GiB RAM, load average {m['load_average']} "
        f"at the start; device `{m['device']}`; GPU: {gpu}",
        f"- **Software:** torch {m['torch']}, transformers {m['transformers']}, caa {m['caa']}, "
        f"Python {m['python']}, {m['platform']}",
        f"- **Grid:** {'quick (smoke run)' if o['quick'] else 'full'}; shape `{o['shape']}`",
        "",
        *(
            [f"- **Unfinished:** the run stopped before {', '.join(results['unfinished'])}", ""]
            if results.get("unfinished")
            else []
        ),
        "## Summary",
        "",
        "| stage | measure | value | vs | ratio |",
        "|---|---|---|---|---|",
    ]
    sections = results["sections"]
    lines += _summary(results)
    lines += _other_runs(others or {})
    for name, s in sections.items():
        lines += ["", f"## {name}", ""]
        if "error" in s:
            lines += [f"Failed: `{s['error']}`"]
            continue
        if s.get("from"):
            f = s["from"]
            lines += [
                f"From an earlier run: `{f['command']}` on {f['date']} (load average {f['load_average']} "
                "at its start).",
                "",
            ]
        lines += [s["setup"] + f" ({s['seconds']:.0f} s).", "", "| measure | value | vs | ratio |"]
        lines += ["|---|---|---|---|", *(_row(r) for r in s["rows"])]
        if s["notes"]:
            lines += ["", *(f"- {n}" for n in s["notes"])]
    return "\n".join(lines) + "\n"


def _summary(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, s in results["sections"].items():
        lines += [_row(r, name) for r in s.get("rows", []) if r["headline"]]
        if "error" in s:
            lines.append(f"| {name} | failed: {s['error']} | | | |")
    return lines


def _other_runs(others: dict[str, Any]) -> list[str]:
    """The summaries of the runs in the output's subdirectories (a GPU, another shape), each with
    its device and date: one page shows every number measured."""
    lines = []
    for sub, other in others.items():
        m, o = other["machine"], other["options"]
        lines += [
            "",
            f"### [{sub}]({sub}/results.md): shape `{o['shape']}` on `{o['device']}`"
            f" ({m.get('gpu', m['cpu'])}), {m['date'][:10]}",
            "",
            f"`{o['command']}`; {other['model']}",
            "",
            "| stage | measure | value | vs | ratio |",
            "|---|---|---|---|---|",
            *_summary(other),
        ]
    return ["", "## Other runs", *lines] if lines else []


def other_runs(out: Path) -> dict[str, Any]:
    """results.json of each subdirectory of ``out`` (the runs on other devices and shapes)."""
    runs = {}
    for path in sorted(out.glob("*/results.json")):
        try:
            runs[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a run being written, or not a benchmark's file: not listed
    return runs


def earlier(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The sections of ``out``'s last run of the same grid (model, device, shape, quick) that this run
    does not measure, each tagged with the run that measured it: a ``--only`` run replaces its own
    sections and keeps the others."""
    try:
        before = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    o, b = results["options"], before.get("options", {})
    if before.get("model") != results.get("model") or any(
        b.get(k) != o[k] for k in ("device", "shape", "quick")
    ):
        return {}
    made = {
        "command": b.get("command"),
        "date": before.get("machine", {}).get("date"),
        "load_average": before.get("machine", {}).get("load_average"),
    }
    return {
        name: {**s, "from": s.get("from", made)}
        for name, s in before.get("sections", {}).items()
        if name not in o["sections"]
    }


def merged(results: dict[str, Any], kept: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """``results`` with the ``kept`` sections of an earlier run, in ``order``."""
    sections = {**kept, **results["sections"]}
    ordered = [n for n in order if n in sections] + [n for n in sections if n not in order]
    return {**results, "sections": {n: sections[n] for n in ordered}}


def write(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """results.json and results.md in ``out``, each replaced whole (never left half-written)."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "results.json", out / "results.md"
    for path, text in ((js, json.dumps(results, indent=2) + "\n"), (md, markdown(results, other_runs(out)))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return js, md
