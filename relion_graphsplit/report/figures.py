"""The page's interactive plotly figures: the graph of cones, the directions, the particles'
confidence, the class maps' FSC and the noise spectrum."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from relion_graphsplit.report.colours import BALANCE_SCALE, EDGE_SCALE, SIGN_COLOURS, class_colour
from relion_graphsplit.report.data import confidence_histograms, fixed, resolution_label
from relion_graphsplit.report.read import FSC_THRESHOLD, Run
from relion_graphsplit.report.tree import side_labels

SYMBOLS = ("circle", "diamond", "square", "cross", "x", "circle-open", "diamond-open")
"""Marker symbols of the graph's disconnected parts, largest part first; the last takes the rest."""


def graph_figure(run: Run) -> go.Figure:
    """The graph of cones on the unit sphere.

    Parameters
    ----------
    run : Run
        The finished run.

    Returns
    -------
    go.Figure
        Cones at their axes (colour: synchronisation sign, symbol: graph part, customdata: cone id)
        joined by edges coloured by weight.
    """
    cones, edges = run.cones, run.edges
    axes = _axes(cones)
    index = {int(c): i for i, c in enumerate(cones["cone"])}
    fig = go.Figure([_sphere_surface()])
    edges = edges[edges["cone1"].isin(list(index)) & edges["cone2"].isin(list(index))]
    if len(edges):
        a = axes[[index[int(c)] for c in edges["cone1"]]]
        b = axes[[index[int(c)] for c in edges["cone2"]]]
        gap = np.full((len(edges), 1), np.nan)
        xyz = [np.hstack([a[:, [k]], b[:, [k]], gap]).ravel() for k in range(3)]
        weight = edges["weight"].to_numpy(np.float64)
        limit = float(np.percentile(np.abs(weight), 98)) or 1.0
        fig.add_trace(go.Scatter3d(
            x=xyz[0], y=xyz[1], z=xyz[2], mode="lines", name="edges", hoverinfo="skip", showlegend=False,
            line=dict(color=np.repeat(weight, 3), colorscale=EDGE_SCALE, cmin=-limit, cmax=limit, width=4,
                      showscale=True, colorbar=dict(title="edge weight", x=1.0, len=0.6)),
        ))
    parts = cones["component"].value_counts()  # largest first
    hover = np.array(_cone_hover(cones), dtype=object)
    for k, part in enumerate(parts.index):
        last = k == len(SYMBOLS) - 1 and len(parts) > len(SYMBOLS)
        chosen = ~cones["component"].isin(parts.index[:k]) if last else cones["component"] == part
        name = f"other parts ({int(chosen.sum())} cones)" if last else f"part {int(part)} ({int(chosen.sum())} cones)"
        sub = cones[chosen]
        fig.add_trace(go.Scatter3d(
            x=sub["axis_x"], y=sub["axis_y"], z=sub["axis_z"], mode="markers", name=name,
            marker=dict(size=6, symbol=SYMBOLS[k], color=[SIGN_COLOURS[1 if s >= 0 else -1] for s in sub["sign"]],
                        line=dict(color="#555555", width=1)),
            customdata=sub["cone"].to_numpy(), hovertext=hover[chosen.to_numpy()], hoverinfo="text",
        ))
        if last:
            break
    fig.update_layout(scene=_scene(), height=560, margin=dict(l=0, r=0, t=30, b=0),
                      legend=dict(x=0, y=1, bgcolor="rgba(255,255,255,0.7)"), template="plotly_white",
                      title=dict(text="Cone graph (click a cone to show it above)", x=0.5))
    return fig


def directions_figure(run: Run) -> go.Figure:
    """The cone axes on two spheres.

    Parameters
    ----------
    run : Run
        The finished run.

    Returns
    -------
    go.Figure
        Left: each cone coloured by the share of its particles on side 1 of the first split (tree
        node 1.1; cones without particles as grey crosses); right: by its particle count. customdata:
        cone id.
    """
    cones = run.cones
    hover = np.array(_cone_hover(cones), dtype=object)
    side = side_labels(run)[1]
    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "scene"}, {"type": "scene"}]],
                        subplot_titles=(f"share on side {side} per cone", "particles per cone"), horizontal_spacing=0.02)
    fraction = cones["class1_fraction"].to_numpy(np.float64)
    known = np.isfinite(fraction)
    for col in (1, 2):
        fig.add_trace(_sphere_surface(), row=1, col=col)
    fig.add_trace(go.Scatter3d(
        x=cones["axis_x"][known], y=cones["axis_y"][known], z=cones["axis_z"][known], mode="markers",
        marker=dict(size=6, color=fraction[known], colorscale=BALANCE_SCALE, cmin=0, cmax=1,
                    colorbar=dict(title="share", x=0.46, len=0.7), line=dict(color="#777777", width=1)),
        hovertext=hover[known], hoverinfo="text", customdata=cones["cone"][known], showlegend=False,
    ), row=1, col=1)
    if not known.all():
        fig.add_trace(go.Scatter3d(
            x=cones["axis_x"][~known], y=cones["axis_y"][~known], z=cones["axis_z"][~known], mode="markers",
            marker=dict(size=5, symbol="x", color="#999999"), name="no particles", hovertext=hover[~known],
            hoverinfo="text",
        ), row=1, col=1)
    counts = cones["particles"].to_numpy()
    fig.add_trace(go.Scatter3d(
        x=cones["axis_x"], y=cones["axis_y"], z=cones["axis_z"], mode="markers",
        marker=dict(size=6, color=counts, colorscale="Viridis", cmin=0, cmax=max(1, int(counts.max())),
                    colorbar=dict(title="particles", x=1.0, len=0.7), line=dict(color="#777777", width=1)),
        hovertext=hover, hoverinfo="text", customdata=cones["cone"], showlegend=False,
    ), row=1, col=2)
    fig.update_layout(scene=_scene(), scene2=_scene(), height=480, margin=dict(l=0, r=0, t=40, b=0),
                      template="plotly_white", showlegend=False)
    return fig


def confidence_figure(run: Run) -> go.Figure:
    """Histograms of each particle's confidence in its class, stacked by class (`data.confidence_histograms`)."""
    panels = confidence_histograms(run)
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels], horizontal_spacing=0.08)
    for col, (_, hist) in enumerate(panels, start=1):
        for k, (edges, counts) in hist.items():
            fig.add_trace(go.Bar(
                x=0.5 * (edges[1:] + edges[:-1]), y=counts, width=np.diff(edges), name=f"class {k}",
                marker=dict(color=class_colour(k)), legendgroup=f"class {k}", showlegend=col == 1,
            ), row=1, col=col)
    fig.update_layout(barmode="stack", height=360, template="plotly_white", margin=dict(l=50, r=20, t=40, b=40),
                      bargap=0)
    fig.update_yaxes(title_text="particles", row=1, col=1)
    return fig


def fsc_figure(run: Run) -> go.Figure:
    """The gold-standard FSC of each class map.

    Parameters
    ----------
    run : Run
        A run with FSC curves (run_model.star).

    Returns
    -------
    go.Figure
        FSC against spatial frequency (1/A), hover in A, the 0.143 threshold dashed; each class
        named with its resolution (`data.resolution_label`).
    """
    fig = go.Figure()
    for k, curve in run.fsc.items():
        label = resolution_label(curve)
        s = curve.frequency.to_numpy()
        angstrom = np.divide(1.0, s, out=np.full_like(s, np.inf), where=s > 0)
        fig.add_trace(go.Scatter(
            x=curve.frequency, y=curve.fsc, mode="lines", line=dict(color=class_colour(k), width=2),
            name=f"class {k}" + (f" ({label} at {FSC_THRESHOLD:g})" if label else ""), customdata=angstrom,
            hovertemplate="%{customdata:.1f} Å<br>FSC %{y:.3f}<extra></extra>",
        ))
    fig.add_hline(y=FSC_THRESHOLD, line=dict(dash="dash", color="#888888"))
    fig.update_layout(height=340, template="plotly_white", margin=dict(l=50, r=20, t=30, b=40),
                      xaxis_title="spatial frequency (1/Å)", yaxis_title="FSC", yaxis_range=[-0.05, 1.05])
    return fig


def noise_figure(spectrum: dict) -> go.Figure:
    """The estimated noise power per ring against spatial frequency.

    Parameters
    ----------
    spectrum : dict
        run_summary.json's noise_spectrum: "resolution" (A) and "relative_power" (power over its
        mean) per ring of the working box.

    Returns
    -------
    go.Figure
        Relative power (log scale) against spatial frequency (1/A), hover in A, 1 dashed.
    """
    resolution = np.asarray(spectrum["resolution"], dtype=np.float64)
    fig = go.Figure(go.Scatter(
        x=1.0 / resolution, y=spectrum["relative_power"], mode="lines+markers", line=dict(color="#555555", width=2),
        customdata=resolution, hovertemplate="%{customdata:.1f} Å<br>power %{y:.2f}<extra></extra>", showlegend=False,
    ))
    fig.add_hline(y=1.0, line=dict(dash="dash", color="#888888"))
    fig.update_layout(height=300, template="plotly_white", margin=dict(l=50, r=20, t=20, b=40),
                      xaxis_title="spatial frequency (1/Å)", yaxis_title="noise power / mean", yaxis_type="log",
                      yaxis_tickvals=[0.1, 0.2, 0.5, 1, 2, 5, 10])
    return fig


def _axes(cones: pd.DataFrame) -> np.ndarray:
    return cones[["axis_x", "axis_y", "axis_z"]].to_numpy(np.float64)


def _sphere_surface() -> go.Surface:
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 48), np.linspace(0, np.pi, 24))
    r = 0.97
    return go.Surface(
        x=r * np.cos(u) * np.sin(v), y=r * np.sin(u) * np.sin(v), z=r * np.cos(v),
        colorscale=[[0, "#eeeeee"], [1, "#eeeeee"]], showscale=False, opacity=0.35,
        hoverinfo="skip", showlegend=False,
    )


def _scene() -> dict:
    axis = dict(range=[-1.15, 1.15], showbackground=False, gridcolor="#dddddd", zerolinecolor="#bbbbbb")
    return dict(xaxis=dict(axis, title="x"), yaxis=dict(axis, title="y"), zaxis=dict(axis, title="z"),
                aspectmode="cube", camera=dict(eye=dict(x=1.4, y=1.4, z=0.9)))


def _cone_hover(cones: pd.DataFrame) -> list[str]:
    return [
        f"cone {int(r.cone)}<br>{int(r.particles)} particles<br>separation {fixed(r.separation)}<br>"
        f"sign {int(r.sign):+d}, part {int(r.component)}<br>side 1.1: {fixed(100 * r.class1_fraction, 0)}%"
        for r in cones.itertuples()
    ]
