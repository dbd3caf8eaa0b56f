"""Collect the demo runs into one markdown report.

Every ``summary.json`` under ``<demo-dir>/<domain>/`` that has a ``headline`` mapping becomes a section
with its headline metrics and links to its ``figures`` (paths relative to that summary's folder).
Domains whose demo did not produce a summary are listed as missing, not silently left out.

    python -m common.report --demo-dir runs/demo --output runs/demo/REPORT.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
from pathlib import Path

from common.checkpoint import environment_versions, git_sha
from common.runlog import write_text_atomic

DOMAIN_TITLES = {
    "common": "Common library (tiny regression, end to end)",
    "asl": "ASL: CBF / ATT estimation",
    "vmat": "VMAT: dose prediction",
    "rsna_spine": "RSNA lumbar spine grading",
    "lensing": "Strong-lens finding",
    "abr": "ABR analysis",
}


def _format(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int,)):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_format(v)}" for k, v in value.items())
    return str(value)


def build_report(demo_dir: Path, output: Path) -> str:
    lines = ["# Demo report", "",
             f"Generated {_dt.datetime.now().isoformat(timespec='seconds')}; git {git_sha() or 'unknown'}; "
             f"{', '.join(f'{k} {v}' for k, v in environment_versions().items())}.", "",
             "Every number below was computed by the demo run on synthetic data at smoke size; it shows the "
             "pipeline works end to end, not what the production configs reach.", ""]
    domains = sorted(p.name for p in demo_dir.iterdir() if p.is_dir()) if demo_dir.is_dir() else []
    ordered = [d for d in DOMAIN_TITLES if d in domains] + [d for d in domains if d not in DOMAIN_TITLES]
    for domain in ordered:
        summaries = []
        for path in sorted((demo_dir / domain).rglob("summary.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                summaries.append((path, {"headline": {"error": f"unreadable summary: {exc}"}}))
                continue
            if isinstance(data, dict) and isinstance(data.get("headline"), dict):
                summaries.append((path, data))
        lines += [f"## {DOMAIN_TITLES.get(domain, domain)}", ""]
        if not summaries:
            lines += [f"No summary with headline metrics under `{(demo_dir / domain).as_posix()}`: "
                      "the demo did not complete.", ""]
            continue
        for path, data in summaries:
            rel = Path(os.path.relpath(path, output.parent)).as_posix()
            lines += [f"Source: [`{rel}`]({rel})", "", "| metric | value |", "|---|---|"]
            for key, value in data["headline"].items():
                lines.append(f"| {key} | {_format(value)} |")
            lines.append("")
            for figure in data.get("figures", []) or []:
                fig_rel = Path(os.path.relpath(path.parent / figure, output.parent)).as_posix()
                lines.append(f"![{Path(figure).stem}]({fig_rel})")
            if data.get("figures"):
                lines.append("")
            if data.get("notes"):
                lines += [str(data["notes"]), ""]
    text = "\n".join(lines)
    write_text_atomic(output, text)
    return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--output", type=Path, default=Path("runs/demo/REPORT.md"))
    args = parser.parse_args(argv)
    text = build_report(args.demo_dir, args.output)
    print(f"wrote {args.output} ({len(text.splitlines())} lines)")
    return {"report": str(args.output)}


if __name__ == "__main__":
    main()
