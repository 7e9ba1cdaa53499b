"""`relion_graphsplit_report`: rebuild the HTML report and PNG figures of a finished split."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from relion_graphsplit.report import write_report

console = Console(highlight=False)
app = typer.Typer(add_completion=False)


@app.command(help="Write OUT/report.html (self-contained, opens offline) and report_*.png from a finished run.")
def report(
    out_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Output directory of a finished run."),
) -> None:
    if not (out_dir / "run_summary.json").is_file():
        console.print(f"[bold red]error:[/] {out_dir} holds no run_summary.json: not a finished run")
        raise typer.Exit(1)
    warnings = write_report(out_dir)
    console.print(f"report: {out_dir / 'report.html'}")
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def main() -> None:
    app()
