"""FastAPI semantic search service over the curated artifact (`uvicorn api.main:app`).

Imports ``curation_dagster.core`` only, never Dagster.
"""
