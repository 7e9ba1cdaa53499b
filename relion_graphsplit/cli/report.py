"""relion_graphsplit_report: rebuild the HTML report and PNG figures of a finished split.

Example::

    relion_graphsplit_report GraphSplit/
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from relion_graphsplit.cli.graphsplit import PLAIN, run_app

app = typer.Typer(**PLAIN)


@app.command(help="Write OUT/report.html (self-contained, opens offline) and report_*.png from a finished run.")
def report(
    out_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Output folder of a finished run."),
) -> None:
    if not (out_dir / "run_summary.json").is_file():
        print(f"error: {out_dir} holds no run_summary.json: not a finished run", file=sys.stderr)
        raise typer.Exit(1)
    from relion_graphsplit.report import write_report  # matplotlib and plotly

    warnings = write_report(out_dir)
    print(f"report: {out_dir / 'report.html'}")
    for warning in warnings:
        print(f"warning: {warning}")


def main() -> None:
    """Console entry point."""
    sys.exit(run_app(app, "relion_graphsplit_report"))
