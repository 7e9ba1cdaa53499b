"""The graph split of chapter 4 of the thesis, one file per step, called in order by pipeline:
options, cones, preprocess, classify (alignment, masks, pca, mixture), graph, maxcut, refine,
diagnostics; classmaps makes the class maps of a split; progress is the progress callback."""
