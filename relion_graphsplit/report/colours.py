"""The report's colours, shared by the page, its plotly figures and the PNG figures."""

CLASS_PALETTE = ("#d6604d", "#4393c3", "#5aae61", "#9970ab", "#e08214", "#35978f", "#c51b7d", "#8c510a")
"""Colours of classes 1, 2, ...; class k takes CLASS_PALETTE[(k - 1) % len(CLASS_PALETTE)]."""
SIDE_COLOURS = {1: CLASS_PALETTE[0], 2: CLASS_PALETTE[1]}
"""Side 1 and side 2 of the first split (tree nodes 1.1 and 1.2), which the cone diagnostics show."""
SIGN_COLOURS = {1: "#222222", -1: "#f28e2b"}
"""A cone's synchronisation sign (+1, -1) -> its marker colour."""
EDGE_SCALE = [[0.0, "#762a83"], [0.5, "#d9d9d9"], [1.0, "#1b7837"]]
"""Plotly colour scale of the graph's edge weights: purple negative, green positive."""
BALANCE_SCALE = [[0.0, SIDE_COLOURS[2]], [0.5, "#f7f7f7"], [1.0, SIDE_COLOURS[1]]]
"""Colour scale of a cone's share on side 1 of the first split, from all side 2 (0) to all side 1 (1)."""
DIFFERENCE_CMAP = "RdBu_r"
"""Matplotlib colour map of the class-minus-consensus sections: red positive, blue negative."""


def class_colour(k: int) -> str:
    """The colour of class `k` (1-based) everywhere in the report."""
    return CLASS_PALETTE[(k - 1) % len(CLASS_PALETTE)]
