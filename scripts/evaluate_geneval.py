"""Score a GenEval-layout folder with the shapes judge; print a table and write JSON.

    python scripts/evaluate_geneval.py OUTDIR [--out OUTDIR/shapes_geneval.json] [--results results.jsonl]

OUTDIR holds <index:05d>/metadata.jsonl and <index:05d>/samples/<k:04d>.png (GenEval's layout).
The JSON has "overall" (mean of per-category accuracies), "per_category" and "num_samples";
--results also writes one line per sample (index, sample, tag, prompt, correct, reason).
"""

import argparse
import json
from pathlib import Path

from tokenloom.evaluation.geneval import format_table, score_folder


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", help="folder in GenEval's output layout")
    parser.add_argument("--out", default=None, help="summary JSON (default: OUTDIR/shapes_geneval.json)")
    parser.add_argument("--results", default=None, help="optional per-sample JSONL")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = score_folder(args.outdir, progress=not args.no_progress)
    summary = {k: v for k, v in report.items() if k != "results"}
    out = Path(args.out) if args.out else Path(args.outdir) / "shapes_geneval.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.results:
        Path(args.results).write_text("".join(json.dumps(r) + "\n" for r in report["results"]))
    print(format_table(report))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
