"""evaluation_report: LightGBM trained on raw vs curated vs same-size random training rows, one held-out test set."""

from typing import List

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from ..core.alignment import AlignmentPolicy, alignment_scores
from ..core.artifacts import load_version
from ._run_version import this_runs_published_version
from ..core.curation import curate
from ..core.dedup import DedupConfig, duplicate_graph, duplicate_groups
from ..core.embedding_set import EmbeddingSet
from ..core.evaluation import EvaluationConfig, run_evaluation
from ..core.evaluation_report import inline_markdown, write_report
from ..resources import CurationPaths
from ._metadata import image_md


_E = EvaluationConfig()  # the one definition of the evaluation defaults (core/evaluation.py)


class EvaluateConfig(dg.Config):
    """The Launchpad face of EvaluationConfig: every default comes from it."""

    test_fraction: float = Field(default=_E.test_fraction,
                                 description="Stratified held-out test share, drawn before curation.")
    split_seed: int = Field(default=_E.split_seed, description="Seed of the test split.")
    seeds: List[int] = Field(default=list(_E.seeds),
                             description="Training seeds; the report shows mean ± std over them.")
    modalities: List[str] = Field(default=list(_E.modalities),
                                  description="Feature sets: any of image+text, image, text (add image and text to see what each modality brings).")
    validation_fraction: float = Field(default=_E.validation_fraction,
                                       description="Early-stopping split taken from the training rows.")
    num_boost_round: int = Field(default=_E.num_boost_round, description="Maximum LightGBM boosting rounds.")
    early_stopping_rounds: int = Field(default=_E.early_stopping_rounds,
                                       description="Stop when validation loss has not improved this long.")
    early_stopping_min_delta: float = Field(
        default=_E.early_stopping_min_delta,
        description="A validation multi-logloss gain smaller than this does not count as an improvement.")
    learning_rate: float = Field(default=_E.learning_rate, description="LightGBM learning rate.")
    feature_dims: int = Field(
        default=_E.feature_dims,
        description="PCA components the embeddings are projected on, fitted on the raw training rows only (the test "
                    "rows never influence it; all three sets share it). 0 = the full embedding (slow: cost is "
                    "linear in the feature count).")
    rows_per_tree: int = Field(
        default=_E.rows_per_tree,
        description="Each tree is grown on this many randomly drawn fit rows (LightGBM bagging, redrawn per round): "
                    "a round's cost stops growing with the data, every training row still takes part. 0 = all rows.")
    max_leaves: int = Field(default=_E.max_leaves, description="Upper limit of the size-scaled num_leaves.")
    num_threads: int = Field(default=_E.num_threads,
                             description="LightGBM threads; 0 = 1 thread below 20k rows (OpenMP overhead "
                                         "dominates on small data), LightGBM's default above.")


def policies_from_manifest(thresholds: dict) -> tuple[AlignmentPolicy, DedupConfig]:
    """The exact curation settings that produced the version (recorded whole with to_dict, read back whole)."""
    return AlignmentPolicy.from_dict(thresholds["alignment"]["policy"]), DedupConfig.from_dict(thresholds["dedup"])


@dg.asset(group_name="evaluate", kinds={"lightgbm", "matplotlib"},
          deps=["curation_removals", "published_curated_version"],
          description="Is curation worth it? A stratified test set is held out from clean_products before curation; "
                      "LightGBM is trained on raw / curated / same-size random training rows (same features and "
                      "settings, several seeds) and scored on it. Report (markdown, metrics.json, plots) under "
                      "$CURATION_ARTIFACTS_DIR/reports/<curated version>/.")
def evaluation_report(context: dg.AssetExecutionContext, config: EvaluateConfig, paths: CurationPaths,
                      clean_products: pl.DataFrame, clip_embeddings: EmbeddingSet,
                      curated_products: pl.DataFrame) -> dg.Output[pl.DataFrame]:
    # This run's version (never whatever CURRENT names: a concurrent run may have published since); when only the
    # evaluation is materialized, the served version.
    version = this_runs_published_version(context.run, paths.artifacts) or load_version(paths.artifacts)
    context.log.info(f"evaluating curated version {version.version}")
    policy, dedup = policies_from_manifest(version.manifest["thresholds"])
    n_unlabelled = clean_products["prdtypecode"].null_count()
    if n_unlabelled:
        context.log.info(f"{n_unlabelled} unlabelled rows are left out of the evaluation (a classifier needs labels)")
        clean_products = clean_products.filter(pl.col("prdtypecode").is_not_null())
    emb = clip_embeddings.select(clean_products["record_id"].to_list())
    record_ids = clean_products["record_id"].to_numpy()
    labels = clean_products["prdtypecode"].to_numpy()
    sha = clean_products["image_sha256"].to_list()

    def curate_train(train_idx: np.ndarray) -> np.ndarray:
        # The same curation as the published artifact, re-run on the training rows only (the test rows never
        # influence which training rows are kept).
        return curate(record_ids[train_idx], labels[train_idx], emb.image[train_idx], emb.text[train_idx],
                      [sha[i] for i in train_idx], policy=policy, dedup=dedup).keep

    # curation's own duplicate groups, each kept on one side of the test split (no test row has a copy in training)
    groups = duplicate_groups(duplicate_graph(emb.image, emb.text, sha, record_ids, dedup))
    names = {int(c): n for c, n in clean_products.select("prdtypecode", "category").unique().iter_rows() if n}
    eval_config = EvaluationConfig(
        test_fraction=config.test_fraction, split_seed=config.split_seed, seeds=tuple(config.seeds),
        modalities=tuple(config.modalities), validation_fraction=config.validation_fraction,
        num_boost_round=config.num_boost_round, early_stopping_rounds=config.early_stopping_rounds,
        early_stopping_min_delta=config.early_stopping_min_delta, learning_rate=config.learning_rate,
        feature_dims=config.feature_dims, rows_per_tree=config.rows_per_tree, max_leaves=config.max_leaves,
        num_threads=config.num_threads or (1 if clean_products.height < 20_000 else 0))
    meaningless = bool(emb.meta.get("meaningless"))
    result = run_evaluation(record_ids=record_ids, labels=labels, image_emb=emb.image, text_emb=emb.text,
                            curate=curate_train, config=eval_config, category_names=names,
                            model_name=str(emb.meta.get("model_name")), meaningless=meaningless,
                            progress=context.log.info, excluded_unlabelled=n_unlabelled, groups=groups)
    out_dir = paths.artifacts / "reports" / version.version
    all_scores = alignment_scores(emb.image, emb.text)  # every clean row, so the cut is visible
    files = write_report(result, out_dir, alignment_scores=all_scores,
                         alignment_thresholds=version.manifest["thresholds"]["alignment"]["used"])
    context.log.info(result.verdict)
    context.log.info(f"evaluation report written to {out_dir / 'report.md'}")
    rows = []
    for modality, mod in result.metrics["modalities"].items():
        for name, m in mod["sets"].items():
            rows.append({"modality": modality, "training_set": name, "n_train": m["n_train"],
                         **{f"{k}_mean": m["mean"][k] for k in m["mean"]},
                         **{f"{k}_std": m["std"][k] for k in m["std"]},
                         "train_seconds": m["train_seconds"]})
    table = pl.DataFrame(rows)
    meta = {
        "verdict": dg.MetadataValue.text(result.verdict),
        "report": dg.MetadataValue.md(inline_markdown(result, out_dir)),
        "report_dir": dg.MetadataValue.path(str(out_dir)),
        "curated_version": dg.MetadataValue.text(version.version),
        "meaningless_model": dg.MetadataValue.bool(meaningless),
        "curated_rows_published": dg.MetadataValue.int(curated_products.height),
    }
    meta.update({k: dg.MetadataValue.float(float(v)) for k, v in result.headline.items()})
    for name, path in files.items():
        if str(path).endswith(".png"):
            meta[f"plot_{name}"] = image_md(path, name)
    return dg.Output(table, metadata=meta)
