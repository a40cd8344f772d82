"""Sinks of the pipeline: BigQuery (Storage Write API), Redis (top content) and the external HTTP API.

Each sink is a PTransform that writes its input and returns the dead letters of what it could not deliver,
so the pipelines route every failure to the one dead-letter table.
"""
