"""Turn ``results.json`` files of ``cw_verl.paper.evaluate score`` into the paper's Table 2 layout.

    python -m cw_verl.paper.report base.json grpo.json clip_cov.json cw_grpo.json \\
        --baseline "Base model" --markdown table2.md --csv table2.csv

Each cell is "accuracy (correct/total)", e.g. "82.4 (412/500)"; Avg. is the unweighted mean of the five
accuracies (as in Table 2), followed by the gain over ``--baseline`` when given. Cells whose scoring had
failures are marked with ``*`` and listed under the markdown table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from cw_verl.paper.evaluate import BENCHMARKS

COLUMNS = {
    "aime24": "AIME24",
    "math500": "MATH-500",
    "amc23": "AMC23",
    "minerva": "Minerva",
    "olympiadbench": "OlympiadBench",
}
assert tuple(COLUMNS) == BENCHMARKS


def load(path: Path) -> dict:
    result = json.loads(path.read_text())
    missing = [b for b in BENCHMARKS if b not in result["benchmarks"]]
    if missing:
        raise ValueError(f"{path}: no results for {missing}; Table 2 needs all of {list(BENCHMARKS)}")
    return result


def accuracy(counts: dict) -> float:
    return 100.0 * counts["correct"] / counts["total"]


def average(result: dict) -> float:
    return sum(accuracy(result["benchmarks"][b]) for b in BENCHMARKS) / len(BENCHMARKS)


def rows(results: list[dict], baseline: str | None) -> list[dict]:
    base = None
    if baseline is not None:
        matches = [r for r in results if r["label"] == baseline]
        if len(matches) != 1:
            raise ValueError(
                f"--baseline {baseline!r} must name exactly one result; labels: {[r['label'] for r in results]}"
            )
        base = average(matches[0])
    table = []
    for r in results:
        row = {"label": r["label"]}
        for b in BENCHMARKS:
            c = r["benchmarks"][b]
            mark = "*" if c.get("failed") else ""
            row[b] = f"{accuracy(c):.1f} ({c['correct']}/{c['total']}){mark}"
        avg = average(r)
        gain = "" if base is None or r["label"] == baseline else f" ({avg - base:+.1f})"
        row["avg"] = f"{avg:.1f}{gain}"
        table.append(row)
    return table


def markdown(results: list[dict], baseline: str | None) -> str:
    header = ["Model", *COLUMNS.values(), "Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows(results, baseline):
        lines.append("| " + " | ".join([row["label"], *(row[b] for b in BENCHMARKS), row["avg"]]) + " |")
    failures = [
        f"{r['label']} / {COLUMNS[b]}: {r['benchmarks'][b]['failed']} answer(s) could not be scored (counted wrong)"
        for r in results
        for b in BENCHMARKS
        if r["benchmarks"][b].get("failed")
    ]
    if failures:
        lines += ["", "\\* " + "; ".join(failures)]
    return "\n".join(lines) + "\n"


def csv_text(results: list[dict], baseline: str | None) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["model", *[f"{b}_{k}" for b in BENCHMARKS for k in ("acc", "correct", "total", "failed")], "avg", "avg_gain"]
    )
    base = next((average(r) for r in results if r["label"] == baseline), None)
    for r in results:
        cells = []
        for b in BENCHMARKS:
            c = r["benchmarks"][b]
            cells += [f"{accuracy(c):.2f}", c["correct"], c["total"], c.get("failed", 0)]
        gain = "" if base is None or r["label"] == baseline else f"{average(r) - base:.2f}"
        writer.writerow([r["label"], *cells, f"{average(r):.2f}", gain])
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results.json files, one per table row, in order")
    parser.add_argument("--baseline", help="label of the row the Avg. gains are measured against")
    parser.add_argument("--markdown", type=Path, help="write the markdown table here (default: stdout)")
    parser.add_argument("--csv", type=Path, help="write the CSV here")
    args = parser.parse_args(argv)
    results = [load(p) for p in args.results]
    md = markdown(results, args.baseline)
    if args.markdown:
        args.markdown.write_text(md)
    else:
        sys.stdout.write(md)
    if args.csv:
        args.csv.write_text(csv_text(results, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
