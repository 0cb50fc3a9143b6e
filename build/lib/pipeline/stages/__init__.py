"""One module per stage of the pipeline; ``pipeline/graph.py`` declares how they connect."""
