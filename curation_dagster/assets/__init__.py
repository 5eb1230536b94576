"""Thin Dagster assets, one module per stage; the logic lives in ``curation_dagster.core``."""
