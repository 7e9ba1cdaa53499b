"""The graph split of chapter 4 of the thesis, one file per step (pipeline calls them in order):
options, cones, preprocess, alignment, masks, pca, mixture, graph, maxcut, refine, classmaps."""
