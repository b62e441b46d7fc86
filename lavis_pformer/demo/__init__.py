"""The miniature P-Former demo on the synthetic shapes world: frozen backbones, pipeline and report."""
