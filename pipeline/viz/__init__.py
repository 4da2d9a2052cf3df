"""Pictures of explanations: heat-map overlays, coloured question tokens, figure grids and the
HTML gallery of the report."""
