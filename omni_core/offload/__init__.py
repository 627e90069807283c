"""Where weights live: Layerwise Offload (block streaming, model-level turns) and regional compile."""
