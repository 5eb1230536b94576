"""Plain-Python curation logic. Never imports dagster: the API, benchmarks and tests import it directly."""
