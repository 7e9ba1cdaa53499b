"""The report of a finished split: report.html and its PNG figures, rebuilt from the run's files.

    read.py     the run's files read back (`Run`, `read_run`)
    checks.py   the warnings the report shows
    tree.py     the tree of the splits tested, with their evidence; its HTML list
    data.py     what the figures draw (histograms, mixture curves, confidence, resolutions)
    sections.py the class maps' central sections: filtered, masked, beside the consensus and the difference
    panels.py   the page's per-cone panel as data, images as PNG data URIs
    figures.py  the page's plotly figures
    pngs.py     the PNG figures (matplotlib)
    page.py     report.html (`render_html`) and `write_report`; its style and script in static/
"""

from relion_graphsplit.report.checks import computed_warnings, report_warnings, run_warnings
from relion_graphsplit.report.page import render_html, write_report
from relion_graphsplit.report.read import Run, read_run

__all__ = ["Run", "computed_warnings", "read_run", "render_html", "report_warnings", "run_warnings", "write_report"]
