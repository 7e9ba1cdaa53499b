"""The report's colours, shared by the page, its plotly figures and the PNG figures."""

CLASS_COLOURS = {1: "#d6604d", 2: "#4393c3"}
"""Class number -> its colour everywhere in the report."""
SIGN_COLOURS = {1: "#222222", -1: "#f28e2b"}
"""A cone's synchronisation sign (+1, -1) -> its marker colour."""
EDGE_SCALE = [[0.0, "#762a83"], [0.5, "#d9d9d9"], [1.0, "#1b7837"]]
"""Plotly colour scale of the graph's edge weights: purple negative, green positive."""
BALANCE_SCALE = [[0.0, CLASS_COLOURS[2]], [0.5, "#f7f7f7"], [1.0, CLASS_COLOURS[1]]]
"""Colour scale of a cone's class-1 fraction, from all class 2 (0) to all class 1 (1)."""
