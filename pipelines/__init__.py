"""Entry points of the engagement pipeline, and the composition they share."""
