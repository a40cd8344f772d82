"""Reusable PTransforms, DoFns and pure business rules of the engagement pipeline."""
