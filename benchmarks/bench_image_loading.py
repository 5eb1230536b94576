"""Image loading for the embedding stage: reduced-size JPEG decoding + vectorised preprocessing vs the seed's path.

In one process, on the bundled Rakuten sample images (547 real product photos, 500x500 progressive JPEGs) and on
baseline (non-progressive) re-encodings of the same photos, one thread:
  * decode only (file bytes → RGB image): full decode vs reduced (Pillow ``draft``: libjpeg DCT scaling);
  * loader (file → the image tower's input tensor): before = full decode + the model's image processor,
    after = core/pixels.ImageLoader as configured by default (reduced decode + the verified vectorised path,
    resizing in torch), and the same with Pillow resizing (the previous default);
  * fidelity: image embeddings of the after path vs the before path on every sample image (cosine min/mean),
    for a full-size ViT-B/32 (random weights: the FLOPs and shapes of the real one, no download) and tiny-random;
  * from files through ClipEncoder.encode_images with tiny-random (the loader-bound case the rehearsal hits),
    before vs after;
  * on a CUDA device (if present): from-JPEG images/s of the full-size model, fp16, both paths;
  * model-input thumbnails (core/thumbs.py, written by cleaning from its one full decode): the embedding stage's
    decode from them vs the original's full decode, what writing them costs cleaning, their embeddings' fidelity.

Also decode only on all cores (the loader's thread pool) against one thread decoding fully: a throughput figure,
not a per-core gain. Targets (issue 11): decode-only images/s after/before >= 2.5x; cosine >= 0.99 to the full-decode path; on a GPU
>= 3,000 images/s from JPEG files. Last line: RESULT {json}.

    python benchmarks/bench_image_loading.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation_dagster.core.encoder import ClipEncoder  # noqa: E402
from curation_dagster.core.images import decode_fully  # noqa: E402
from curation_dagster.core.pixels import ImageLoader  # noqa: E402
from curation_dagster.core.system import cpu_model  # noqa: E402
from curation_dagster.core.thumbs import Thumbnails  # noqa: E402

SAMPLE_IMAGES = REPO / "data" / "sample" / "images"


def best_rate(fn, items, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def loaders(enc) -> dict[str, ImageLoader]:
    side = enc.image_size
    return {"before": ImageLoader(enc.image_processor, enc.adapter, decode="full", fallback_side=side, vectorise=False),
            "after_pillow_resize": ImageLoader(enc.image_processor, enc.adapter, decode="reduced", fallback_side=side,
                                               torch_resize=False),
            "after": ImageLoader(enc.image_processor, enc.adapter, decode="reduced", fallback_side=side)}


def embed_with(enc, loader: ImageLoader, files: list[Path]) -> np.ndarray:
    enc.images = loader
    return enc.encode_images(files, batch_size=64, num_workers=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--images-dir", type=Path, default=None,
                    help="also embed up to --limit JPEGs found under this directory (e.g. a bench_pipeline dataset) "
                         "with tiny-random and the default loader (all cores), before vs after")
    ap.add_argument("--limit", type=int, default=5000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    files = sorted(SAMPLE_IMAGES.rglob("*.jpg"))
    progressive = sum(bool(Image.open(f).info.get("progressive")) for f in files)
    cpu = cpu_model()
    print(f"machine: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}; "
          f"one thread")
    print(f"images: {len(files)} sample photos ({progressive} progressive JPEGs), "
          f"{np.mean([f.stat().st_size for f in files]) / 1024:.0f} KB on average, sizes "
          f"{sorted({Image.open(f).size for f in files})[:3]}")
    result: dict = {"cpu_model": cpu, "cores": os.cpu_count(), "images": len(files), "progressive": progressive}

    from benchmarks.bench_search import save_full_size_clip  # the same random-weight ViT-B/32 as the search bench
    from curation_dagster.core.settings import model_cache_dir

    full_dir = save_full_size_clip(model_cache_dir() / "bench-clip-vit-b32-random")
    big = ClipEncoder.load(str(full_dir), "cpu", precision="fp32")
    tiny = ClipEncoder.load("tiny-random", "cpu", precision="fp32")
    ld = loaders(big)
    print(f"after path: {ld['after'].describe()}")

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        baseline = []  # the same photos re-encoded as baseline JPEGs (what most other catalogues serve)
        for i, f in enumerate(files):
            out = Path(tmp) / f"b{i}.jpg"
            Image.open(f).convert("RGB").save(out, "JPEG", quality=90, progressive=False)
            baseline.append(out)
        # Model-input thumbnails (core/thumbs.py), as clean_products writes them from its own full decode.
        thumbs = Thumbnails(Path(tmp) / "thumbs")
        thumb_files = []
        for f in files:
            copy = Path(tmp) / f"t-{f.name}"
            copy.write_bytes(f.read_bytes())
            thumb_files.append(Path(decode_fully(copy, thumbs=thumbs).thumb))
        sets = {"sample (progressive)": files, "baseline re-encodings": baseline, "thumbnails": thumb_files}
        result["decode"] = {}
        print("\n== decode only (file → RGB image), images/s, best of", args.repeat)
        for label, fs in sets.items():
            datas = [Path(f).read_bytes() for f in fs]
            before = best_rate(lambda d: ld["before"].open(io.BytesIO(d)), datas, args.repeat)
            after = best_rate(lambda d: ld["after"].open(io.BytesIO(d)), datas, args.repeat)
            print(f"   {label:24s} full {before:6.0f}  reduced {after:6.0f}  ratio {after / before:.2f}x  [{cpu}]")
            result["decode"][label] = {"full": round(before, 1), "reduced": round(after, 1),
                                       "ratio": round(after / before, 2)}
        thumb_rate = result["decode"]["thumbnails"]["reduced"]
        full_rate = result["decode"]["sample (progressive)"]["full"]
        reduced_rate = result["decode"]["sample (progressive)"]["reduced"]
        print(f"   the embedding stage's decode, sample photos: full {full_rate:6.0f} -> from thumbnails "
              f"{thumb_rate:6.0f}  ratio {thumb_rate / full_rate:.2f}x  ({thumb_rate / reduced_rate:.2f}x vs reduced "
              f"decoding of the original)  [{cpu}]")
        result["decode_thumbnails"] = {"full_original": full_rate, "thumbnail": thumb_rate,
                                       "ratio": round(thumb_rate / full_rate, 2),
                                       "ratio_to_reduced": round(thumb_rate / reduced_rate, 2)}
        # What a thumbnail costs cleaning: decode_fully (the whole-file check it runs anyway) with and without
        # writing one, one thread, a fresh thumbnail folder each round (a re-run finds them and writes none).
        copies = [Path(tmp) / f"t-{f.name}" for f in files]
        rounds = iter(range(10 ** 6))
        without = best_rate(lambda c: decode_fully(c), copies, args.repeat)
        with_thumbs = best_rate(lambda cs: [decode_fully(c, thumbs=Thumbnails(Path(tmp) / f"r{next(rounds)}"))
                                            for c in cs], [copies], args.repeat) * len(copies)
        extra_ms = 1e3 / with_thumbs - 1e3 / without
        print(f"\n== cleaning's full decode, one thread: without thumbnails {without:6.0f}/s, writing them "
              f"{with_thumbs:6.0f}/s (+{extra_ms:.2f} ms per image, once; the embedding stage saves "
              f"{1e3 / reduced_rate - 1e3 / thumb_rate:.2f} ms per image per run)  [{cpu}]")
        result["cleaning_decode"] = {"without_thumbnails": round(without, 1), "with_thumbnails": round(with_thumbs, 1),
                                     "extra_ms_per_image": round(extra_ms, 3)}
        # What the embedding stage gets: its loader decodes on every core (Pillow releases the GIL while decoding).
        # Not a per-core gain: the ratio below is all cores reduced vs one thread full.
        cores = os.cpu_count() or 1
        result["decode_all_cores"] = {"threads": cores}
        print(f"\n== decode only, {cores} threads (a thread pool, as the loader runs) vs one thread full, images/s")
        with ThreadPoolExecutor(cores) as pool:
            for label, fs in sets.items():
                datas = [Path(f).read_bytes() for f in fs]
                rate = best_rate(lambda ds: list(pool.map(lambda d: ld["after"].open(io.BytesIO(d)), ds)), [datas],
                                 args.repeat) * len(datas)
                ratio = rate / result["decode"][label]["full"]
                print(f"   {label:24s} reduced, {cores} threads {rate:6.0f}  ratio to one thread full {ratio:.2f}x  [{cpu}]")
                result["decode_all_cores"][label] = {"reduced": round(rate, 1), "ratio_to_full_1_thread": round(ratio, 2)}

        print("\n== loader (file → input tensor, batches of 64), images/s")
        result["loader"] = {}
        for label, fs in sets.items():
            batches = [fs[i:i + 64] for i in range(0, len(fs), 64)]
            rates = {k: best_rate(lambda b, L=L: L.load(b), batches, args.repeat) * len(fs) / len(batches)
                     for k, L in ld.items()}
            ratio = rates["after"] / rates["before"]
            print(f"   {label:24s} before {rates['before']:6.0f}  after, Pillow resize {rates['after_pillow_resize']:6.0f}"
                  f"  after {rates['after']:6.0f}  ratio {ratio:.2f}x (Pillow resize "
                  f"{rates['after_pillow_resize'] / rates['before']:.2f}x)  [{cpu}]")
            result["loader"][label] = {**{k: round(v, 1) for k, v in rates.items()}, "ratio": round(ratio, 2),
                                       "ratio_pillow_resize": round(rates["after_pillow_resize"] / rates["before"], 2)}

        print("\n== fidelity: image embeddings, after path vs before path (full decode + the processor), sample "
              "images; and from the thumbnails")
        result["fidelity"] = {}
        for name, enc in (("ViT-B/32 (random weights)", big), ("tiny-random", tiny)):
            L = loaders(enc)
            ref = embed_with(enc, L["before"], files)
            got = embed_with(enc, L["after"], files)
            from_thumbs = embed_with(enc, L["after"], thumb_files)
            full_fast = embed_with(enc, ImageLoader(enc.image_processor, enc.adapter, decode="full",
                                                    fallback_side=enc.image_size), files[:128])
            cos = np.sum(ref * got, axis=1)
            cos_t = np.sum(ref * from_thumbs, axis=1)
            vec = float(np.min(np.sum(ref[:128] * full_fast, axis=1)))
            print(f"   {name:26s} cosine min {cos.min():.4f}  mean {cos.mean():.5f}  (vectorised alone, full decode: "
                  f"min {vec:.6f}); from thumbnails: min {cos_t.min():.4f}  mean {cos_t.mean():.5f}")
            result["fidelity"][name] = {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 6),
                                        "vectorised_only_min": round(vec, 7),
                                        "thumbnails_min": round(float(cos_t.min()), 5),
                                        "thumbnails_mean": round(float(cos_t.mean()), 6)}

        print("\n== from files through ClipEncoder.encode_images, tiny-random (loader-bound), one thread, images/s")
        rates = {}
        for k, L in loaders(tiny).items():
            t0 = time.perf_counter()
            embed_with(tiny, L, files)
            rates[k] = len(files) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        embed_with(tiny, loaders(tiny)["after"], thumb_files)
        rates["after_from_thumbnails"] = len(files) / (time.perf_counter() - t0)
        print(f"   before {rates['before']:.0f}  after {rates['after']:.0f}  ratio {rates['after'] / rates['before']:.2f}x; "
              f"from thumbnails {rates['after_from_thumbnails']:.0f}  ratio "
              f"{rates['after_from_thumbnails'] / rates['before']:.2f}x  [{cpu}]")
        result["encode_images_tiny"] = {**{k: round(v, 1) for k, v in rates.items()},
                                        "ratio": round(rates["after"] / rates["before"], 2),
                                        "ratio_from_thumbnails": round(rates["after_from_thumbnails"] / rates["before"], 2)}

        if torch.cuda.is_available():
            gpu = ClipEncoder.load(str(full_dir), "cuda", precision="fp16")
            result["cuda"] = {"device": torch.cuda.get_device_name()}
            for label, fs in (("originals", files), ("thumbnails", thumb_files)):
                many = fs * max(1, 20_000 // len(fs))
                for k, L in loaders(gpu).items():
                    gpu.images = L
                    gpu.encode_images(many[:512], batch_size=256)
                    t0 = time.perf_counter()
                    gpu.encode_images(many, batch_size=256)
                    rate = len(many) / (time.perf_counter() - t0)
                    result["cuda"][f"{label}_{k}"] = round(rate, 1)
                    print(f"   CUDA {result['cuda']['device']}: {label}, {k} {rate:.0f} images/s from JPEG files "
                          f"({gpu.last_loader})")
        else:
            print("\n(no CUDA device in this run: the GPU from-JPEG rate was not measured)")
            result["cuda"] = None

    if args.images_dir:
        extra = []
        for f in sorted(args.images_dir.rglob("*.jpg")):  # a bench_pipeline dataset has planted broken files
            try:
                ld["before"].open(f)
            except Exception:  # noqa: BLE001
                continue
            extra.append(f)
            if len(extra) >= args.limit:
                break
        torch.set_num_threads(os.cpu_count() or 1)
        rates = {}
        for k, L in loaders(tiny).items():
            tiny.images = L
            t0 = time.perf_counter()
            tiny.encode_images(extra, batch_size=64)
            rates[k] = len(extra) / (time.perf_counter() - t0)
        print(f"\n== {len(extra)} images under {args.images_dir}, tiny-random, default loader ({tiny.last_loader}, "
              f"{torch.get_num_threads()} threads): before {rates['before']:.0f}  after {rates['after']:.0f} images/s  "
              f"ratio {rates['after'] / rates['before']:.2f}x  [{cpu}]")
        result["encode_images_dir"] = {"dir": str(args.images_dir), "images": len(extra),
                                       **{k: round(v, 1) for k, v in rates.items()},
                                       "ratio": round(rates["after"] / rates["before"], 2)}

    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
