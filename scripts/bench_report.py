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


def markdown(results: dict[str, Any]) -> str:
    m, o = results["machine"], results["options"]
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if "gpu" in m else "none used"
    lines = [
        "# caa benchmarks",
        "",
        f"Written by `{o['command']}` on {m['date']} in {results['total_seconds'] / 60:.1f} min. "
        "Every ratio compares two measurements taken in this same run, on this machine.",
        "",
        f"- **Model:** {results['model']}",
        f"- **Machine:** {m['cpu']}, {m['cores_available']} of {m['cores']} cores "
        f"({m['torch_threads']} torch threads), {m['memory_gib']} GiB RAM, load average {m['load_average']} "
        f"at the start; device `{m['device']}`; GPU: {gpu}",
        f"- **Software:** torch {m['torch']}, transformers {m['transformers']}, caa {m['caa']}, "
        f"Python {m['python']}, {m['platform']}",
        f"- **Grid:** {'quick (smoke run)' if o['quick'] else 'full'}; shape `{o['shape']}`",
        "",
        "## Summary",
        "",
        "| stage | measure | value | vs | ratio |",
        "|---|---|---|---|---|",
    ]
    sections = results["sections"]
    for name, s in sections.items():
        lines += [_row(r, name) for r in s.get("rows", []) if r["headline"]]
        if "error" in s:
            lines.append(f"| {name} | failed: {s['error']} | | | |")
    for name, s in sections.items():
        lines += ["", f"## {name}", ""]
        if "error" in s:
            lines += [f"Failed: `{s['error']}`"]
            continue
        lines += [s["setup"] + f" ({s['seconds']:.0f} s).", "", "| measure | value | vs | ratio |"]
        lines += ["|---|---|---|---|", *(_row(r) for r in s["rows"])]
        if s["notes"]:
            lines += ["", *(f"- {n}" for n in s["notes"])]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "results.json", out / "results.md"
    js.write_text(json.dumps(results, indent=2) + "\n")
    md.write_text(markdown(results))
    return js, md
