"""The Dagster code location: `dagster dev` (workspace.yaml) and `dagster asset materialize -m curation_dagster.definitions`."""

import dagster as dg

from .assets.clean import clean_products
from .assets.curate import curated_products
from .assets.embeddings import clip_embeddings
from .assets.evaluate import evaluation_report
from .assets.images import product_images
from .assets.publish import published_curated_version
from .assets.sample import sampled_products
from .assets.source import raw_products
from .automation import JOBS, SCHEDULES, SENSORS
from .checks import ALL_CHECKS
from .resources import build_resources

ASSETS = [raw_products, sampled_products, product_images, clean_products, clip_embeddings, curated_products,
          published_curated_version, evaluation_report]

defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=JOBS,
    schedules=SCHEDULES,
    sensors=SENSORS,
    resources=build_resources(),
    # The stages are a chain and each step would otherwise pay a fresh interpreter + torch import: run in one
    # process by default. The sharded embedding job opts into the multiprocess executor (automation.py).
    executor=dg.in_process_executor,
)
