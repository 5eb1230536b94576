"""Multimodal data curation with Dagster.

Kept import-light on purpose: ``api`` imports ``curation_dagster.core`` without loading Dagster.
The Dagster definitions live in ``curation_dagster.definitions``.
"""
