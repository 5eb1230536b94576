"""Reader for the Rakuten France multimodal catalogue in its original challenge / Kaggle layout.

Layout: ``X_*.csv`` (unnamed index, designation, description, productid, imageid), ``Y_*.csv`` (unnamed index,
prdtypecode) in the same row order, images under ``images/image_train/`` or ``images/image_test/`` named
``image_{imageid}_product_{productid}.jpg``, optionally ``categories.csv`` (prdtypecode → names; the 27 official
names ship with the package, see categories.py).

An X file with no Y file of its split (Kaggle's ``X_test_update.csv``) holds *unlabelled* products: they are kept
with a null ``prdtypecode`` (searchable, curated with a class-free threshold; only the evaluation needs labels).
An X row of a *labelled* file without its Y row is an error in that file and is rejected as ``missing_label``; X rows
sharing one index are all rejected as ``duplicate_index`` (the label cannot be assigned), a code that is not a
positive integer as ``invalid_label``.

Files are found by pattern *and* by their columns, so renamed or extra CSVs do not confuse the reader. Every source
row ends up either in the products table or in the rejections table with a reason.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from .categories import official_categories
from .rejections import empty_rejections, make_rejections

X_COLUMNS = ("designation", "description", "productid", "imageid")
Y_COLUMNS = ("prdtypecode",)
IMAGE_SUBDIRS = ("image_train", "image_test")

# Rejections about Y rows that have no product row: they are reported but are not product rows entering the stage.
LABEL_ONLY_REASONS = ("label_without_product", "duplicate_label")



PRODUCT_SCHEMA = {
    "record_id": pl.Int64,
    "source_file": pl.Utf8,
    "source_index": pl.Int64,
    "productid": pl.Int64,
    "imageid": pl.Int64,
    "designation": pl.Utf8,
    "description": pl.Utf8,
    "prdtypecode": pl.Int64,
    "category": pl.Utf8,
    "category_en": pl.Utf8,
    "source_image_path": pl.Utf8,
    "source": pl.Utf8,  # provenance: "dataset" (the source files) or "api" (added through the API's inbox)
}


class SourceLayoutError(ValueError):
    """The directory does not look like the Rakuten source layout; the message lists what was found and what is missing."""


@dataclass
class SourceReadResult:
    products: pl.DataFrame
    rejections: pl.DataFrame
    files: dict[str, str] = field(default_factory=dict)
    n_source_rows: int = 0
    notes: list[str] = field(default_factory=list)
    unknown_codes: list[int] = field(default_factory=list)  # labels with no category name (shown as the code)


def _header(path: Path) -> list[str]:
    # errors="replace": a stray Latin-1 byte (in any CSV of the folder, even an unrelated one) must not stop the
    # layout check; the data itself is read as lossy UTF-8 too.
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as fh:
        row = next(csv.reader(fh), None)
    return [c.strip() for c in (row or [])]


def _split_key(path: Path) -> str:
    """'X_train_update.csv' → 'train', 'Y_sample.csv' → 'sample': pairs X and Y files of the same split."""
    stem = path.stem[2:]  # drop 'X_' / 'Y_'
    return stem.split("_")[0].lower()


def _read_csv_strict(path: Path, expected_cols: int) -> pl.DataFrame:
    """Read every column as text; on a malformed file raise an error naming the file and the line."""
    named = [c for c in _header(path) if c]  # unnamed columns: the row index, a trailing comma's empty column
    if len(set(named)) != len(named):  # polars would rename an exact repeat (name_duplicated_0) and read on
        raise SourceLayoutError(f"{path}: repeated column names in the header: {named}")
    source: Path | io.BytesIO = path
    with path.open("rb") as fh:
        head = fh.read(1 << 16)
    if b"\r" in head and b"\n" not in head:  # old Mac line endings (Excel's "CSV (Macintosh)"): polars sees one line
        data = path.read_bytes()
        if b"\n" not in data:
            source = io.BytesIO(data.replace(b"\r", b"\n"))
    try:
        df = pl.read_csv(source, infer_schema=False, encoding="utf8-lossy", raise_if_empty=True)
    except Exception as exc:  # polars' parse errors are not specific enough to show a user; find the line ourselves
        with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as fh:
            reader = csv.reader(fh)
            for row in reader:
                if len(row) != expected_cols:
                    raise SourceLayoutError(
                        f"{path}: line {reader.line_num}: expected {expected_cols} fields, found {len(row)}"
                    ) from exc
        raise SourceLayoutError(f"{path}: could not be parsed as CSV: {exc}") from exc
    # "productid, imageid" (a space after the comma) names the columns the layout check saw (_header strips them)
    names = [c.strip() for c in df.columns]
    if len(set(names)) != len(names):
        raise SourceLayoutError(f"{path}: repeated column names in the header: {df.columns}")
    return df.rename(dict(zip(df.columns, names)))


def find_source_files(data_dir: Path) -> tuple[list[tuple[Path, Path | None]], Path | None, Path | None]:
    """Return [(X file, matching Y file or None)], the images dir and categories.csv."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SourceLayoutError(
            f"data directory {data_dir} does not exist. Set CURATION_DATA_DIR to a directory in the Rakuten layout "
            "(X_*.csv, Y_*.csv, images/image_train/)."
        )
    csvs = sorted(p for p in data_dir.glob("*.csv") if p.is_file())
    x_files, y_files, other, empty_y = [], [], [], []
    for p in csvs:
        cols = set(_header(p))
        if p.name.upper().startswith("X_") and set(X_COLUMNS) <= cols:
            x_files.append(p)
        elif p.name.upper().startswith("Y_") and set(Y_COLUMNS) <= cols:
            y_files.append(p)
        else:
            other.append(p)
            if p.name.upper().startswith("Y_") and not cols:
                empty_y.append(p)
    images_dir = data_dir / "images"
    images_dir = images_dir if images_dir.is_dir() else None
    missing = []
    if not x_files:
        missing.append(f"an X_*.csv with columns {', '.join(X_COLUMNS)}")
    if images_dir is None:
        missing.append("an images/ directory (images/image_train/image_{imageid}_product_{productid}.jpg)")
    if missing:
        found = ", ".join(f"{p.name} (columns: {', '.join(_header(p)) or 'none'})" for p in csvs) or "no CSV files"
        subdirs = ", ".join(sorted(d.name + "/" for d in data_dir.iterdir() if d.is_dir())) or "no subdirectories"
        raise SourceLayoutError(
            f"{data_dir} does not match the Rakuten source layout. Missing: {'; '.join(missing)}. "
            f"Found: {found}; {subdirs}."
        )
    pairs: list[tuple[Path, Path | None]] = []
    by_key = {_split_key(y): y for y in y_files}
    for x in x_files:
        y = by_key.get(_split_key(x))
        if y is None and len(x_files) == 1 and len(y_files) == 1:
            y = y_files[0]
        damaged = [e for e in empty_y if _split_key(e) == _split_key(x)]
        if y is None and damaged:  # read as "X without Y", every labelled row would silently lose its label
            raise SourceLayoutError(f"{damaged[0]} is empty (no header, no rows): the labels of {x.name} are missing. "
                                    f"Restore it, or remove it to read {x.name} as unlabelled products.")
        pairs.append((x, y))
    categories = data_dir / "categories.csv"
    return pairs, images_dir, categories if categories.is_file() else None


def read_categories(path: Path | None) -> pl.DataFrame:
    """Category names: the source's categories.csv over the official names shipped with the package."""
    official = official_categories()
    if path is None:
        return official
    try:
        df = pl.read_csv(path, infer_schema=False, encoding="utf8-lossy")
    except Exception as exc:  # noqa: BLE001 - polars' message, with the file named
        raise SourceLayoutError(f"{path}: could not be parsed as CSV: {exc}") from exc
    if "prdtypecode" not in df.columns:
        raise SourceLayoutError(f"{path}: expected a prdtypecode column, found {df.columns}")
    fr = "category_fr" if "category_fr" in df.columns else ("category" if "category" in df.columns else None)
    own = df.select(
        pl.col("prdtypecode").str.strip_chars().cast(pl.Int64, strict=False),
        (pl.col(fr) if fr else pl.lit(None, pl.Utf8)).alias("category"),
        (pl.col("category_en") if "category_en" in df.columns else pl.lit(None, pl.Utf8)).alias("category_en"),
    ).drop_nulls("prdtypecode").unique("prdtypecode", keep="first")
    return pl.concat([own, official.join(own, on="prdtypecode", how="anti")])


def source_image_name(imageid: int, productid: int) -> str:
    """The file name of a product image in the source layout (collected images are named by artifacts.image_file_name)."""
    return f"image_{imageid}_product_{productid}.jpg"


def _to_int(col: str) -> pl.Expr:
    return pl.col(col).str.strip_chars().cast(pl.Int64, strict=False)


def read_pair(x_path: Path, y_path: Path | None) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Join one X/Y pair by the unnamed index column. Returns (rows, rejections, X rows read)."""
    x = _read_csv_strict(x_path, len(_header(x_path)))
    index_col = x.columns[0]
    if index_col in X_COLUMNS:
        raise SourceLayoutError(f"{x_path}: first column must be the unnamed row index, found {index_col!r}")
    x = x.rename({index_col: "_index"}).with_row_index("_line", offset=2)
    n_read = x.height
    rejections = []

    x = x.with_columns(_to_int("_index").alias("source_index"), _to_int("productid").alias("_pid"),
                       _to_int("imageid").alias("_iid"))
    all_x_index = x.select("source_index").drop_nulls().unique()  # Y rows of rejected X rows are not orphans
    # ids name the product and its image file (/images/{imageid}_{productid}.jpg): positive integers, as the API's
    # own ids; the row index only has to be an integer (Kaggle's starts at 0)
    ok_id = (pl.col("_pid") > 0) & (pl.col("_iid") > 0) & pl.col("source_index").is_not_null()
    bad_id = x.filter(~ok_id.fill_null(False))
    if bad_id.height:
        rejections.append(make_rejections(
            bad_id["_pid"].to_list(), "raw", "invalid_id",
            [f"{x_path.name} line {r['_line']}: index={r['_index']!r} productid={r['productid']!r} imageid={r['imageid']!r}: "
             "the index must be an integer, productid and imageid positive integers" for r in bad_id.iter_rows(named=True)]))
        x = x.filter(ok_id.fill_null(False))

    if y_path is None:  # an unlabelled split (Kaggle's X_test_update.csv): products without a class
        rows = _product_rows(x, x_path, pl.lit(None, pl.Int64))
        return rows, (pl.concat(rejections) if rejections else empty_rejections()), n_read

    # The join key must be unambiguous: with one index on two X rows, both would take one label (a chair labelled
    # as a book), so every row sharing an index is rejected.
    dup_x = x.filter(pl.col("source_index").is_duplicated())
    if dup_x.height:
        rejections.append(make_rejections(
            dup_x["_pid"].to_list(), "raw", "duplicate_index",
            [f"{x_path.name} line {r['_line']}: index {r['source_index']} is on more than one row; its label in "
             f"{y_path.name} cannot be assigned" for r in dup_x.iter_rows(named=True)]))
        x = x.filter(~pl.col("source_index").is_duplicated())

    y = _read_csv_strict(y_path, len(_header(y_path)))
    if y.columns[0] in Y_COLUMNS:
        raise SourceLayoutError(f"{y_path}: first column must be the unnamed row index, found {y.columns[0]!r}")
    y = y.rename({y.columns[0]: "_index"}).with_row_index("_yline", offset=2)
    y = y.with_columns(_to_int("_index").alias("source_index"), _to_int("prdtypecode").alias("_code"))

    bad_y_index = y.filter(pl.col("source_index").is_null())
    if bad_y_index.height:
        rejections.append(make_rejections(
            [None] * bad_y_index.height, "raw", "label_without_product",
            [f"{y_path.name} line {r['_yline']}: index {r['_index']!r} is not an integer"
             for r in bad_y_index.iter_rows(named=True)]))
        y = y.filter(pl.col("source_index").is_not_null())
    dup_y = y.filter(pl.col("source_index").is_duplicated() & (pl.int_range(pl.len()).over("source_index") > 0))
    if dup_y.height:
        rejections.append(make_rejections(
            [None] * dup_y.height, "raw", "duplicate_label",
            [f"{y_path.name} line {r['_yline']}: index {r['source_index']} appears more than once; first kept"
             for r in dup_y.iter_rows(named=True)]))
        y = y.unique("source_index", keep="first", maintain_order=True)

    joined = x.join(y.select("source_index", "_code", "prdtypecode", "_yline"), on="source_index", how="left")
    no_label = joined.filter(pl.col("_yline").is_null())
    if no_label.height:
        rejections.append(make_rejections(
            no_label["_pid"].to_list(), "raw", "missing_label",
            [f"{x_path.name} line {r['_line']}: index {r['source_index']} has no row in {y_path.name}"
             for r in no_label.iter_rows(named=True)]))
    # Product type codes are positive; a zero or negative one would also merge with the "unlabelled" stratum.
    joined = joined.with_columns(pl.when(pl.col("_code") > 0).then(pl.col("_code")).alias("_code"))
    bad_label = joined.filter(pl.col("_yline").is_not_null() & pl.col("_code").is_null())
    if bad_label.height:
        rejections.append(make_rejections(
            bad_label["_pid"].to_list(), "raw", "invalid_label",
            [f"{y_path.name} line {r['_yline']}: prdtypecode {r['prdtypecode']!r} is not a positive integer"
             for r in bad_label.iter_rows(named=True)]))
    orphan_y = y.join(all_x_index, on="source_index", how="anti")
    if orphan_y.height:
        rejections.append(make_rejections(
            [None] * orphan_y.height, "raw", "label_without_product",
            [f"{y_path.name} line {r['_yline']}: index {r['source_index']} has no row in {x_path.name}"
             for r in orphan_y.iter_rows(named=True)]))

    rows = _product_rows(joined.filter(pl.col("_code").is_not_null()), x_path, pl.col("_code"))
    rej = pl.concat(rejections) if rejections else empty_rejections()
    return rows, rej, n_read


def _product_rows(x: pl.DataFrame, x_path: Path, code: pl.Expr) -> pl.DataFrame:
    return x.select(
        pl.col("_pid").alias("record_id"),
        pl.lit(x_path.name).alias("source_file"),
        "source_index",
        pl.col("_pid").alias("productid"),
        pl.col("_iid").alias("imageid"),
        pl.col("designation").fill_null(""),
        pl.col("description").fill_null(""),
        code.cast(pl.Int64).alias("prdtypecode"),
        pl.col("_line").cast(pl.Int64).alias("_line"),
    )


def _empty_products() -> pl.DataFrame:
    schema = {k: v for k, v in PRODUCT_SCHEMA.items() if k not in ("category", "category_en", "source_image_path")}
    return pl.DataFrame(schema={**schema, "_line": pl.Int64})


def _resolve_image(images_dir: Path, imageid: int, productid: int) -> str:
    name = source_image_name(imageid, productid)
    for sub in IMAGE_SUBDIRS:
        p = images_dir / sub / name
        if p.exists():
            return str(p)
    return str(images_dir / IMAGE_SUBDIRS[0] / name)  # expected place; product_images records it as missing


def inbox_products(inbox_root: Path | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Live inbox entries (see core/inbox.py) as product rows, before the dataset's duplicate-id rule applies, and
    the entries refused (reason invalid_inbox_entry)."""
    from .inbox import Inbox

    schema = {k: v for k, v in PRODUCT_SCHEMA.items() if k not in ("category", "category_en", "source_image_path",
                                                                  "source")}
    if inbox_root is None:
        return pl.DataFrame(schema={**schema, "_line": pl.Int64, "_image": pl.Utf8}), empty_rejections()
    rows, bad = [], []
    for e in Inbox(inbox_root.parent).entries() if inbox_root.is_dir() else []:
        r = e.record
        row = {"record_id": e.record_id, "source_file": f"inbox/{e.path.name}", "source_index": 0,
               "productid": r.get("productid", e.record_id), "imageid": r.get("imageid", e.record_id),
               "designation": r.get("designation") or "", "description": r.get("description") or "",
               "prdtypecode": r.get("prdtypecode"), "_line": 1, "_image": str(e.image_path)}
        problem = _inbox_problem(row)
        if problem:  # written by another tool or by hand: this entry is refused, the others are read
            bad.append((e.record_id, f"inbox/{e.path.name}: {problem}"))
        else:
            rows.append(row)
    rejections = make_rejections([i for i, _ in bad], "raw", "invalid_inbox_entry", [d for _, d in bad]) \
        if bad else empty_rejections()
    return pl.DataFrame(rows, schema={**schema, "_line": pl.Int64, "_image": pl.Utf8}), rejections


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**63


def _inbox_problem(row: dict) -> str | None:
    """What makes an inbox record unreadable as a product row (the API writes valid ones; others may not)."""
    for key in ("productid", "imageid"):
        if not _positive_int(row[key]):
            return f"{key} {row[key]!r} is not a positive integer"
    if row["prdtypecode"] is not None and not _positive_int(row["prdtypecode"]):
        return f"prdtypecode {row['prdtypecode']!r} is not a positive integer"
    for key in ("designation", "description"):
        if not isinstance(row[key], str):
            return f"{key} is a {type(row[key]).__name__}, not text"
    return None


def read_source(data_dir: Path, inbox_root: Path | None = None) -> SourceReadResult:
    """Read every X/Y pair under ``data_dir`` into one products table (record_id = productid) plus rejections;
    with ``inbox_root``, products added through the API follow the dataset's (provenance column ``source``)."""
    pairs, images_dir, categories_path = find_source_files(Path(data_dir).resolve())
    if images_dir is None:  # find_source_files raises first; a real error, not an assert, if that ever changes
        raise SourceLayoutError(f"{data_dir}: no images/ directory")
    frames, rejections, n_read, notes = [], [], 0, []
    for x_path, y_path in pairs:
        rows, rej, n = read_pair(x_path, y_path)
        frames.append(rows)
        rejections.append(rej)
        n_read += n
        if y_path is None:
            notes.append(f"{x_path.name} has no matching Y file: its {rows.height} rows are unlabelled products "
                         "(curated and searchable; not used by the evaluation)")
    products = pl.concat(frames) if frames else _empty_products()
    products = products.with_columns(pl.lit(None, pl.Utf8).alias("_image"))
    api_rows, api_rejected = inbox_products(inbox_root)
    if api_rows.height:
        notes.append(f"{api_rows.height} products added through the API (inbox) are read with the dataset")
        products = pl.concat([products, api_rows])
    n_read += api_rows.height + api_rejected.height
    rejections.append(api_rejected)

    # A productid is the record's identity: one row per productid is kept, every other is rejected naming it.
    # Which one: a product added through the API (the API answered 201 and serves it: it replaces the dataset's
    # row, as an update would), else a labelled row (X_test.csv sorts before X_train.csv: the first read would drop
    # the label), else the first read.
    products = products.with_row_index("_pos").with_columns(
        pl.col("_image").is_not_null().alias("_api"), pl.col("prdtypecode").is_null().alias("_unlabelled"))
    kept = products.sort(["_api", "_unlabelled", "_pos"], descending=[True, False, False]).group_by(
        "productid", maintain_order=True).agg(
        pl.col("_pos").first().alias("_kept_pos"), pl.col("source_file").first().alias("_kept_file"),
        pl.col("_line").first().alias("_kept_line"), pl.col("_api").first().alias("_kept_api"))
    products = products.join(kept, on="productid", how="left", maintain_order="left")
    dup_mask = pl.col("_pos") != pl.col("_kept_pos")
    dups = products.filter(dup_mask)
    for reason, mask in (("superseded_by_api", dups["_kept_api"] & ~dups["_api"]),
                         ("duplicate_productid", ~(dups["_kept_api"] & ~dups["_api"]))):
        part = dups.filter(mask)
        if part.height:
            rejections.append(make_rejections(part["record_id"].to_list(), "raw", reason, [
                f"{r['source_file']} line {r['_line']}: productid {r['productid']} "
                + (f"was added through the API ({r['_kept_file']}), which replaces this row" if reason != "duplicate_productid"
                   else f"already read at {r['_kept_file']} line {r['_kept_line']}"
                   + (" (labelled; kept)" if r["_unlabelled"] and r["_kept_pos"] > r["_pos"] else ""))
                for r in part.iter_rows(named=True)]))
    products = products.filter(~dup_mask).drop("_pos", "_line", "_api", "_unlabelled", "_kept_pos", "_kept_file",
                                                "_kept_line", "_kept_api")

    categories = read_categories(categories_path)
    products = products.join(categories, on="prdtypecode", how="left")
    unknown = sorted(products.filter(pl.col("prdtypecode").is_not_null() & pl.col("category").is_null())
                     ["prdtypecode"].unique().to_list())
    if unknown:
        notes.append(f"prdtypecode(s) without a category name (shown as the code): {unknown}")
    products = products.with_columns(
        pl.struct("imageid", "productid").map_elements(
            lambda r: _resolve_image(images_dir, r["imageid"], r["productid"]), return_dtype=pl.Utf8
        ).alias("source_image_path")
    ).with_columns(
        pl.coalesce("_image", "source_image_path").alias("source_image_path"),
        pl.when(pl.col("_image").is_null()).then(pl.lit("dataset")).otherwise(pl.lit("api")).alias("source"),
    ).select(list(PRODUCT_SCHEMA))
    products = products.sort("source_file", "source_index")
    files = {"images_dir": str(images_dir), "categories": str(categories_path) if categories_path else ""}
    for x_path, y_path in pairs:
        files[x_path.name] = y_path.name if y_path else "(no Y file)"
    rej = pl.concat([r for r in rejections if r.height]) if any(r.height for r in rejections) else empty_rejections()
    return SourceReadResult(products=products, rejections=rej, files=files, n_source_rows=n_read, notes=notes,
                            unknown_codes=unknown)
