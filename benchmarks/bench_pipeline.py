"""Full-size rehearsal: the whole Dagster graph on a synthetic catalogue in the real Kaggle layout.

Generates (seeded, reproducible) ``--rows`` products laid out exactly like the Kaggle download:

    X_train_update.csv  Y_train_CVw08PX.csv  X_test_update.csv   (unnamed index column)
    images/image_train/image_<imageid>_product_<productid>.jpg  images/image_test/...

* distinct 500x500 JPEGs drawn procedurally (class-tinted gradient, random shapes, a word) -- not copies, so
  dedup has nothing to eat except what is planted;
* French-like titles/descriptions from word lists (some descriptions empty, some with HTML and entities);
* the 27 official codes with a skewed class distribution: proportional to the per-class counts of the real
  training set as remembered from the public data (764-10,209 rows per class, 84,916 in all) -- APPROXIMATE;
* ~15% unlabelled rows (X_test_update.csv, images in image_test/);
* ~3% planted near-duplicates: an earlier row's image resized and re-encoded at another JPEG quality, with the
  same title, under a new productid/imageid;
* ~0.5% planted faults, in equal parts: truncated JPEG, zero-byte file, missing image, empty designation.

Then runs every asset and check in-process with ``dagster.materialize`` (tiny-random model, fp32, CPU, ephemeral
instance, default run config) and prints per-stage wall time (STEP_START -> STEP_SUCCESS from the run's event
log), peak RSS (sampler thread over this process and its children, plus ru_maxrss), rows in/out per stage, and
a projection of the embedding stage for a real ViT-B/32. Generation time is reported apart from the graph time.

    python benchmarks/bench_pipeline.py --rows 1000
    python benchmarks/bench_pipeline.py --rows 10000 --out /tmp/rehearsal10k   # keep the data
    python benchmarks/bench_pipeline.py --rows 85000 --out /data/rehearsal85k --keep

The machine is shared (other engineers run tests on it): the load average is printed next to every timing.
Last line: ``RESULT {json}``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from curation_dagster.core.system import cpu_model, load_average  # noqa: E402

# Real training-set rows per class (public Rakuten/Kaggle data, as remembered: approximate), in code order.
CLASS_COUNTS = {
    10: 3116, 40: 2508, 50: 1681, 60: 832, 1140: 2671, 1160: 3953, 1180: 764, 1280: 4870, 1281: 2070,
    1300: 5045, 1301: 807, 1302: 2491, 1320: 3241, 1560: 5073, 1920: 4303, 1940: 803, 2060: 4993, 2220: 824,
    2280: 4760, 2403: 4774, 2462: 1421, 2522: 4989, 2582: 2589, 2583: 10209, 2585: 2496, 2705: 2761, 2905: 872,
}
CODES = sorted(CLASS_COUNTS)
UNLABELLED_FRACTION = 0.15
DUP_FRACTION = 0.03
FAULT_FRACTION = 0.005
FAULTS = ("truncated_jpeg", "zero_byte", "missing_image", "empty_designation")
SIZE = 500

# Reference numbers used for the ViT-B/32 projection (see --help of the flags).
H200_FP16_MODEL_ONLY = 25_663.2   # benchmarks/results/bench_embedding_h200_fp16.txt, "(a) model only, fp16"
H200_FP16_FROM_JPEG = 999.4       # same file, "(b) JPEG files -> embeddings ... auto -> process loader"
H200_FP16_TEXTS = 1321.2          # same file, "text: ... texts/s"
# CPU: no CPU output of bench_embedding.py is committed; the measured figure documented in
# curation_dagster/core/encoder.py (encode_images docstring): "ViT-B/32 on 2 quiet cores, best of 5: model alone
# 21.2, inline 20.9 images/s" (fp32). --measure-vit measures it again here (under the machine's current load).
CPU_VIT_B32_MODEL_ONLY = 21.2

_NOUNS = {
    10: "livre roman tome recueil édition poèmes", 40: "jeu cartouche console manette édition import",
    50: "support chargeur câble housse figurine manette", 60: "console portable pack édition limitée rétro",
    1140: "figurine statuette pop collection personnage", 1160: "carte booster deck collection rare holo",
    1180: "figurine jeu rôle plateau miniature peinture", 1280: "peluche poupée jouet éveil hochet",
    1281: "jeu société puzzle cartes famille", 1300: "drone voiture radiocommandée hélicoptère batterie",
    1301: "chaussettes bébé body chaussons naissance", 1302: "ballon trottinette raquette jeu plein air",
    1320: "poussette biberon siège auto lit parapluie", 1560: "armoire chaise table commode étagère",
    1920: "coussin housse rideau plaid drap", 1940: "café thé biscuits chocolat épices",
    2060: "lampe guirlande cadre décoration bougie", 2220: "collier gamelle jouet chien chat",
    2280: "magazine revue numéro journal hebdo", 2403: "livres lot collection bd mangas",
    2462: "jeux lot consoles occasion pack", 2522: "cahier stylo classeur agenda carnet",
    2582: "salon jardin parasol transat hamac", 2583: "piscine pompe filtre bâche robot",
    2585: "tondeuse taille-haie outil arrosage", 2705: "livre roman essai biographie poche",
    2905: "jeu pc téléchargement code édition",
}
_ADJ = ("noir blanc rouge bleu vert grand petit nouveau pliable étanche électrique rechargeable magnifique "
        "complet original premium robuste léger").split()
_FILL = ("pour avec sans de la le les des en et très idéal qualité dimensions matière livraison rapide garantie "
         "produit neuf couleur taille cm kg lot pièces").split()
_HTML = ("<p>{}</p>", "<b>{}</b><br />{}", "<ul><li>{}</li><li>{}</li></ul>", "{} &amp; {}", "<div>{}&nbsp;{}</div>")


# ------------------------------------------------------------------------------------------------ generation


def _text(rng: np.random.Generator, code: int) -> tuple[str, str]:
    nouns = _NOUNS[code].split()
    title = " ".join([str(rng.choice(nouns)).capitalize(), *rng.choice(_ADJ, size=rng.integers(1, 4)),
                      *rng.choice(nouns, size=rng.integers(0, 3)), str(rng.integers(1, 999))])
    r = rng.random()
    if r < 0.35:
        desc = ""
    else:
        words = [*rng.choice(_FILL, size=rng.integers(8, 40)), *rng.choice(nouns, size=3)]
        plain = " ".join(words)
        if r < 0.7:
            tpl = str(rng.choice(_HTML))
            half = len(words) // 2
            desc = tpl.format(" ".join(words[:half]), " ".join(words[half:])) if tpl.count("{}") == 2 \
                else tpl.format(plain)
        else:
            desc = plain
    return title, desc


def _draw(seed: int, code_idx: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    hue = np.array([(code_idx * 37) % 256, (code_idx * 91) % 256, (code_idx * 151) % 256], dtype=np.float32)
    a, b = hue + rng.normal(0, 40, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0.0, 1.0, SIZE, dtype=np.float32)
    w = (t[:, None] * rng.uniform(0.2, 1.0) + t[None, :] * rng.uniform(0.0, 0.8))[..., None] / 1.8
    arr = np.clip(a * (1 - w) + b * w, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 10))):
        x0, y0 = rng.integers(0, SIZE - 20, 2)
        x1, y1 = x0 + rng.integers(10, 250), y0 + rng.integers(10, 250)
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            d.ellipse([int(x0), int(y0), int(x1), int(y1)], fill=col)
        elif kind == 1:
            d.rectangle([int(x0), int(y0), int(x1), int(y1)], fill=col, outline=(0, 0, 0))
        else:
            pts = [tuple(int(v) for v in rng.integers(0, SIZE, 2)) for _ in range(3)]
            d.polygon(pts, fill=col)
    d.text((int(rng.integers(10, 300)), int(rng.integers(10, 450))), f"#{seed % 100000}", fill=(255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(rng.integers(75, 93)), progressive=True)  # as every Rakuten photo
    return buf.getvalue()


def _near_duplicate(src: bytes, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    with Image.open(io.BytesIO(src)) as im:
        side = int(rng.integers(380, 480))
        out = im.convert("RGB").resize((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=int(rng.integers(60, 90)), progressive=True)
    return buf.getvalue()


def _write_images(jobs: list[tuple]) -> int:
    """Worker: jobs of (path, seed, code_idx, dup_of_path or None, dup_seed, fault)."""
    for path, seed, code_idx, dup_src, fault in jobs:
        data = _near_duplicate(Path(dup_src).read_bytes(), seed) if dup_src else _draw(seed, code_idx)
        if fault == "missing_image":
            continue
        if fault == "zero_byte":
            data = b""
        elif fault == "truncated_jpeg":
            data = data[: len(data) // 2]
        Path(path).write_bytes(data)
    return len(jobs)


def generate(root: Path, n: int, seed: int = 0, workers: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    weights = np.array([CLASS_COUNTS[c] for c in CODES], dtype=float)
    weights /= weights.sum()
    n_dup = int(round(n * DUP_FRACTION))
    n_base = n - n_dup
    codes = rng.choice(len(CODES), size=n_base, p=weights)
    # ids: distinct, spread like the real ones (productid ~ 1e5..4.3e9, imageid ~ 1e6..1.3e9)
    pids = rng.choice(np.arange(100_000, 100_000 + 50 * n), size=n, replace=False) * 83 + 17
    iids = rng.choice(np.arange(1_000_000, 1_000_000 + 50 * n), size=n, replace=False) * 7 + 3
    rows = []
    for i in range(n_base):
        title, desc = _text(rng, CODES[codes[i]])
        rows.append({"code_idx": int(codes[i]), "designation": title, "description": desc,
                     "productid": int(pids[i]), "imageid": int(iids[i]), "dup_of": None, "fault": None})
    # near-duplicates of earlier (non-fault) rows: same class and title, new ids
    for j, src in enumerate(rng.choice(n_base, size=n_dup, replace=False)):
        s = rows[int(src)]
        rows.append({**s, "productid": int(pids[n_base + j]), "imageid": int(iids[n_base + j]),
                     "dup_of": int(src), "fault": None})
    order = rng.permutation(n)
    rows = [rows[i] for i in order]
    unlabelled = rng.random(n) < UNLABELLED_FRACTION
    n_fault = max(len(FAULTS), int(round(n * FAULT_FRACTION)))
    dup_sources = {r["dup_of"] for r in rows if r["dup_of"] is not None}
    candidates = [i for i, r in enumerate(rows) if r["dup_of"] is None]
    fault_rows = rng.choice(candidates, size=n_fault, replace=False)
    # the original rows are re-identified by position after the shuffle
    pos_of_base = {int(b): p for p, b in enumerate(order) if b < n_base}
    for k, i in enumerate(fault_rows):
        rows[int(i)]["fault"] = FAULTS[k % len(FAULTS)]
        if rows[int(i)]["fault"] == "empty_designation":
            rows[int(i)]["designation"] = "" if k % 2 else "<br />&nbsp;"
    # a fault on a duplicate's source would make the copy's source vanish: sources get their bytes first anyway

    for sub in ("image_train", "image_test"):
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)

    def img_path(i: int) -> str:
        r = rows[i]
        sub = "image_test" if unlabelled[i] else "image_train"
        return str(root / "images" / sub / f"image_{r['imageid']}_product_{r['productid']}.jpg")

    firsts, seconds = [], []
    base_path: dict[int, str] = {}
    for i, r in enumerate(rows):
        if r["dup_of"] is None:
            firsts.append((img_path(i), seed * 1_000_003 + i, r["code_idx"], None, r["fault"]))
    for i, r in enumerate(rows):
        if r["dup_of"] is not None:
            src_pos = pos_of_base[r["dup_of"]]
            # a copy of a faulty original is drawn afresh from the same seed (the source bytes are not on disk)
            src_path = img_path(src_pos)
            base_path[i] = src_path
            seconds.append((img_path(i), seed * 7_000_003 + i, r["code_idx"], src_path, None))
    # sources whose file is deliberately absent or broken: write a good private copy to read from
    broken = {img_path(pos_of_base[b]) for b in dup_sources if rows[pos_of_base[b]]["fault"]}
    fixed = []
    for j, job in enumerate(seconds):
        if job[3] in broken:
            fixed.append((job[0], job[1], job[2], None, None))
        else:
            fixed.append(job)
    seconds = fixed

    def run(jobs: list[tuple]) -> None:
        chunks = [jobs[k::max(1, workers * 8)] for k in range(max(1, workers * 8))]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_images, chunks))

    run(firsts)
    run(seconds)

    def write_x(name: str, idx: list[int]) -> None:
        with open(root / name, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["", "designation", "description", "productid", "imageid"])
            for k, i in enumerate(idx):
                r = rows[i]
                w.writerow([k, r["designation"], r["description"], r["productid"], r["imageid"]])

    train = [i for i in range(n) if not unlabelled[i]]
    test = [i for i in range(n) if unlabelled[i]]
    write_x("X_train_update.csv", train)
    write_x("X_test_update.csv", test)
    with open(root / "Y_train_CVw08PX.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "prdtypecode"])
        for k, i in enumerate(train):
            w.writerow([k, CODES[rows[i]["code_idx"]]])
    faults = {f: sum(1 for r in rows if r["fault"] == f) for f in FAULTS}
    return {"rows": n, "train": len(train), "test_unlabelled": len(test), "near_duplicates": n_dup,
            "faults": faults}


# ------------------------------------------------------------------------------------------------ measuring


class PeakRSS:
    """Samples RSS of this process plus its children every 0.2 s."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0

    def _rss(self) -> int:
        total = self.proc.memory_info().rss
        for c in self.proc.children(recursive=True):
            try:
                total += c.memory_info().rss
            except Exception:
                pass
        return total

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._rss())
            except Exception:
                pass
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def vit_b32_cpu_images_per_s(seconds: float = 12.0) -> float:
    """Model-only images/s of a full-size ViT-B/32 image tower (random weights, real FLOPs) on this CPU, fp32,
    batch 32 -- the same quantity as bench_embedding.py's '(a) model only, fp32' (no CPU output of that script
    is committed under benchmarks/results, so it is measured here, in this process)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512)).eval()
    x = torch.randn(32, 3, 224, 224)
    done, t0 = 0, None
    with torch.inference_mode():
        model(pixel_values=x[:8])  # warm-up
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(pixel_values=x)
            done += x.shape[0]
    return done / (time.perf_counter() - t0)


def step_times(instance, run_id: str) -> dict[str, float]:
    from dagster import DagsterEventType

    start, end = {}, {}
    for e in instance.all_logs(run_id):
        ev = e.dagster_event
        if ev is None or not ev.step_key:
            continue
        if ev.event_type == DagsterEventType.STEP_START:
            start[ev.step_key] = e.timestamp
        elif ev.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            end[ev.step_key] = e.timestamp
    order = sorted(start, key=start.get)
    return {k: end[k] - start[k] for k in order if k in end}


def materialization_meta(instance, run_id: str) -> dict[str, dict]:
    from dagster import DagsterEventType

    out: dict[str, dict] = {}
    for e in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
        mat = e.asset_materialization
        vals = {}
        for k, v in mat.metadata.items():
            if isinstance(getattr(v, "value", None), (int, float)) and not isinstance(v.value, bool):
                vals[k] = v.value
        out[mat.asset_key.to_user_string()] = vals
    return out


def run_graph(data_dir: Path, artifacts_dir: Path):
    import dagster as dg

    from curation_dagster.checks import ALL_CHECKS
    from curation_dagster.definitions import ASSETS
    from curation_dagster.resources import build_resources

    resources = build_resources(data_dir=str(data_dir), artifacts_dir=str(artifacts_dir), model="tiny-random",
                                device="cpu")
    instance = dg.DagsterInstance.ephemeral()
    t0 = time.perf_counter()
    result = dg.materialize([*ASSETS, *ALL_CHECKS], resources=resources, instance=instance, raise_on_error=True)
    total = time.perf_counter() - t0
    return result, instance, total


STAGE_ROWS = [  # step -> (asset whose metadata holds the counts, rows-in key, rows-out key)
    ("raw_products", "raw_products", "rows_in", "rows_out"),
    ("sampled_products", "sampled_products", "rows_in", "rows_out"),
    ("product_images", "product_images", "rows", "rows"),
    ("clean_products", "clean_products", "rows_in", "rows_out"),
    ("clip_embeddings", "clip_embeddings", "rows", "rows"),
    ("curated_products", "curated_products", "rows_in", "rows_curated"),
    ("evaluation_report", "evaluation_report", "n_train_raw", "n_curated"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--out", type=Path, default=None, help="dataset + artifacts go here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated data (always kept with --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="image generation processes")
    p.add_argument("--reuse", action="store_true", help="reuse a dataset already generated under --out")
    p.add_argument("--reuse-embeddings", action="store_true",
                   help="keep the previous run's embedding cache under --out (measures everything but the model)")
    p.add_argument("--measure-vit", action="store_true",
                   help="measure ViT-B/32 model-only CPU images/s here (~15 s) instead of the documented 21.2")
    args = p.parse_args()

    os.environ["CURATION_CLIP_MODEL"] = "tiny-random"
    os.environ["CURATION_PRECISION"] = "fp32"
    os.environ.setdefault("CURATION_DEVICE", "cpu")
    cpu, cores = cpu_model(), os.cpu_count()
    print(f"CPU: {cpu} ({cores} cores); shared machine: other engineers run tests at the same time; {load_average()}",
          flush=True)

    root = args.out or Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    data_dir, artifacts = root / "data", root / "artifacts"
    kept_cache = None
    if args.reuse_embeddings and (artifacts / "embedding_cache").is_dir():
        kept_cache = root / ".embedding_cache"  # kept across the reset below: clip_embeddings then hits the cache
        shutil.rmtree(kept_cache, ignore_errors=True)
        os.replace(artifacts / "embedding_cache", kept_cache)
    if artifacts.exists():
        shutil.rmtree(artifacts)
    if kept_cache is not None:
        artifacts.mkdir(parents=True)
        os.replace(kept_cache, artifacts / "embedding_cache")
        print("reusing the embedding cache of the previous run: clip_embeddings' time is NOT a model time", flush=True)
    t0 = time.perf_counter()
    if args.reuse and (data_dir / "X_train_update.csv").is_file():
        gen = {"rows": args.rows, "reused": True}
        gen_s = 0.0
        print(f"reusing the dataset under {data_dir}")
    else:
        if data_dir.exists():
            shutil.rmtree(data_dir)
        data_dir.mkdir(parents=True)
        gen = generate(data_dir, args.rows, seed=args.seed, workers=args.workers)
        gen_s = time.perf_counter() - t0
        du = sum(f.stat().st_size for f in (data_dir / "images").rglob("*.jpg"))
        print(f"generation: {gen} in {gen_s:.1f} s ({args.rows / max(gen_s, 1e-9):.0f} rows/s, "
              f"{args.workers} processes), images {du / 1e6:.0f} MB; {load_average()}", flush=True)

    load_before = os.getloadavg()
    with PeakRSS() as rss:
        result, instance, total = run_graph(data_dir, artifacts)
    load_after = os.getloadavg()
    ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KB -> GB
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    peak_gb = max(rss.peak / 1024 ** 3, ru_self)
    times = step_times(instance, result.run_id)
    meta = materialization_meta(instance, result.run_id)
    stage_s = {k: v for k, v in times.items() if k in {s[0] for s in STAGE_ROWS} or k == "published_curated_version"}
    checks_s = sum(v for k, v in times.items() if k not in stage_s)

    print(f"\ngraph: {total:.1f} s wall for {args.rows} rows (success={result.success}); {load_average()} "
          f"(before the run {load_before[0]:.2f}, after {load_after[0]:.2f})")
    print(f"peak RSS: {peak_gb:.2f} GB (sampler self+children {rss.peak / 1024 ** 3:.2f} GB; ru_maxrss self "
          f"{ru_self:.2f} GB, largest child {ru_children:.2f} GB)")
    print(f"\n{'stage':<28}{'seconds':>9}{'share':>7}{'rows in':>10}{'rows out':>10}{'us/row':>9}")
    stages_rows = {}
    for step, asset, kin, kout in STAGE_ROWS:
        if step not in times:
            continue
        m = meta.get(asset, {})
        rin, rout = m.get(kin), m.get(kout)
        stages_rows[step] = {"in": rin, "out": rout}
        per_row = 1e6 * times[step] / args.rows
        print(f"{step:<28}{times[step]:>9.2f}{100 * times[step] / total:>6.0f}%{rin if rin is not None else '-':>10}"
              f"{rout if rout is not None else '-':>10}{per_row:>9.0f}")
    if "published_curated_version" in times:
        print(f"{'published_curated_version':<28}{times['published_curated_version']:>9.2f}")
    print(f"{'asset checks (all)':<28}{checks_s:>9.2f}")
    other = total - sum(times.values())
    print(f"{'dagster overhead/IO between':<28}{other:>9.2f}")
    ev = meta.get("evaluation_report", {})
    print("evaluation: " + ", ".join(f"{k}={ev[k]:.4f}" for k in ("raw_macro_f1", "curated_macro_f1",
                                                                    "random_macro_f1") if k in ev)
          + " (tiny-random: meaningless)")

    # Projection for a real ViT-B/32: every stage as measured, the embedding stage replaced by the model's rate.
    n_emb = int(stages_rows.get("clip_embeddings", {}).get("out") or args.rows)
    if args.measure_vit:
        vit_cpu, src = vit_b32_cpu_images_per_s(), f"measured now, fp32, batch 32, {load_average()}"
    else:
        vit_cpu = CPU_VIT_B32_MODEL_ONLY
        src = "documented in core/encoder.py: ViT-B/32 model alone, fp32, 2 quiet cores, best of 5"
    rest = total - times.get("clip_embeddings", 0.0)
    # text tower: ~12 layers x 77 tokens at width 512, about a quarter of the image tower's cost (bench_embedding's
    # text figure on H200 is 1.3k texts/s from real tokenisation; on CPU the text tower is ~4x cheaper than images)
    cpu_embed = n_emb / vit_cpu * 1.25
    gpu_embed = n_emb / H200_FP16_FROM_JPEG + n_emb / H200_FP16_TEXTS
    print(f"\nprojection for a real ViT-B/32 ({n_emb} rows embedded):")
    print(f"  CPU: model-only {vit_cpu:.1f} images/s ({src}) -> embedding ~{cpu_embed / 60:.1f} min "
          f"(images + texts at ~1/4 of an image each) + rest of graph {rest / 60:.1f} min = "
          f"~{(cpu_embed + rest) / 60:.1f} min")
    print(f"  GPU (H200 fp16, benchmarks/results/bench_embedding_h200_fp16.txt): model-only {H200_FP16_MODEL_ONLY:,.0f} "
          f"images/s, but from JPEG files {H200_FP16_FROM_JPEG:,.0f} images/s (decoding bound) and 1,321 texts/s -> "
          f"embedding ~{gpu_embed / 60:.1f} min + rest {rest / 60:.1f} min = ~{(gpu_embed + rest) / 60:.1f} min")

    res = {
        "rows": args.rows, "generation_s": round(gen_s, 1), "generation": gen, "total_s": round(total, 1),
        "peak_rss_gb": round(peak_gb, 3), "stages": {k: round(v, 2) for k, v in stage_s.items()},
        "checks_s": round(checks_s, 2), "stage_rows": stages_rows,
        "evaluation": {k: ev[k] for k in ("raw_macro_f1", "curated_macro_f1", "random_macro_f1") if k in ev},
        "projection_vit_b32": {"cpu_images_per_s": round(vit_cpu, 1), "cpu_images_per_s_source": src,
                               "cpu_total_min": round((cpu_embed + rest) / 60, 1),
                               "gpu_from_jpeg_images_per_s": H200_FP16_FROM_JPEG,
                               "gpu_total_min": round((gpu_embed + rest) / 60, 1)},
        "cpu_model": cpu, "cores": cores, "loadavg": [round(v, 2) for v in os.getloadavg()],
        "loadavg_before_graph": [round(v, 2) for v in load_before],
        "shared_machine": True,
    }
    if args.out is None and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
