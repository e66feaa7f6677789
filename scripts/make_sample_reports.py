"""Regenerate the sample reports committed under reports/.

    python scripts/make_sample_reports.py            # CPU, about a minute on 2 cores
    python scripts/make_sample_reports.py --device cuda

It profiles the built-in default model (``dbprofile.models.DEFAULT_PRESET``) with the default
techniques twice, at the CLI's default batch size and at a larger one, and writes

    reports/<model>.json / .html              the default run (what `dbprofile run` writes)
    reports/<model>-b<N>.json / .html         the same model at the larger batch size
    reports/<model>-batch-comparison.html     the two runs side by side (`dbprofile compare`)

Each run records the `dbprofile run` command that reproduces it, so the committed reports
say how to get their numbers without this script.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dbprofile.loading import load_spec
from dbprofile.measure.runner import run
from dbprofile.models import DEFAULT_PRESET
from dbprofile.report import write_comparison, write_run_report
from dbprofile.techniques import DEFAULT_TECHNIQUES, parse_techniques

DEFAULT_BATCH = 8  # `dbprofile run`'s default --batch-size
LARGER_BATCH = 32


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--out-dir", default="reports", help="folder for the reports (default reports/)")
    parser.add_argument(
        "--batch-sizes",
        default=f"{DEFAULT_BATCH},{LARGER_BATCH}",
        help=f"the two batch sizes to compare (default {DEFAULT_BATCH},{LARGER_BATCH})",
    )
    parser.add_argument("--steps", type=int, default=2, help="measured steps per technique (default 2)")
    args = parser.parse_args(argv)

    out_dir = Path(args.out_dir)
    spec = load_spec(None)
    techniques = parse_techniques(list(DEFAULT_TECHNIQUES))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    written: list[Path] = []
    results = []
    for i, batch in enumerate(batch_sizes):
        stem = DEFAULT_PRESET if i == 0 else f"{DEFAULT_PRESET}-b{batch}"
        json_path = out_dir / f"{stem}.json"
        command = f"dbprofile run --batch-size {batch} --device {args.device} --steps {args.steps} --out {json_path}"
        result = run(spec, techniques, [batch], device=args.device, steps=args.steps, out=json_path, command=command)
        result.save(json_path)  # the runner may already have written it; saving again is harmless
        written += [json_path, write_run_report(result, json_path.with_suffix(".html"))]
        results.append(result)
    cmp_path = out_dir / f"{DEFAULT_PRESET}-batch-comparison.html"
    jsons = " ".join(str(p) for p in written if p.suffix == ".json")
    written.append(write_comparison(results, cmp_path, command=f"dbprofile compare {jsons} -o {cmp_path}"))
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
