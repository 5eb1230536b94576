"""What a model family costs on this CPU: full-size CLIP ViT-B/32 vs SigLIP base patch16-256 multilingual (and
SigLIP 2 base NaFlex), random weights, built locally from the published architecture hyperparameters.

Random weights have the real FLOPs (no download possible here), so images/s and texts/s are the real
checkpoints' speeds; the embeddings themselves are meaningless. Every family runs through the same
DualEncoder code (its adapter's preprocessing, padding and feature extraction) in the same process, one after
the other, and the ratios are against CLIP measured here. Images: the model on preprocessed batches of real
sample photos (decoding excluded: it is the same JPEGs for every family); texts: real French titles of the
bundled sample, encoded as the pipeline does (CLIP pads to the longest title of a batch, SigLIP always to 64).

    python benchmarks/bench_models.py [--images 16] [--texts 256] [--repeats 2] [--families clip,siglip,siglip2]

Last line: RESULT {json}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from curation_dagster.core.system import cpu_model  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from curation_dagster.core import tiny_clip, tiny_siglip  # noqa: E402
from curation_dagster.core.encoder import DualEncoder  # noqa: E402
from curation_dagster.core.system import available_cpus  # noqa: E402

SAMPLE = REPO / "data" / "sample"

# Published hyperparameters (config.json of the Hub checkpoints).
VIT_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
ARCHS = {
    "clip": dict(id="openai/clip-vit-base-patch32", image=224, patch=32, text_len=77, vocab=49408, dim=512),
    "siglip": dict(id="google/siglip-base-patch16-256-multilingual", image=256, patch=16, text_len=64,
                   vocab=250000, dim=768),
    "siglip2": dict(id="google/siglip2-base-patch16-naflex", image=256, patch=16, text_len=64, vocab=256000,
                    dim=768),
}


def build(family: str) -> DualEncoder:
    a = ARCHS[family]
    if family == "clip":
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        tok = tiny_clip._build_tokenizer()[0]
        cfg = CLIPConfig(text_config=dict(vocab_size=a["vocab"], hidden_size=512, intermediate_size=2048,
                                          num_hidden_layers=12, num_attention_heads=8,
                                          max_position_embeddings=a["text_len"]),
                         vision_config=dict(image_size=a["image"], patch_size=a["patch"], **VIT_B),
                         projection_dim=a["dim"])
        model, proc = CLIPModel(cfg), CLIPImageProcessor()
    else:
        tok = tiny_siglip._build_tokenizer(tiny_siglip.corpus())[0]  # same segmentation cost class; ids < vocab
        text = dict(vocab_size=a["vocab"], max_position_embeddings=a["text_len"], **VIT_B)
        if family == "siglip":
            from transformers import SiglipConfig, SiglipModel
            from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

            cfg = SiglipConfig(text_config=text, vision_config=dict(image_size=a["image"], patch_size=a["patch"],
                                                                    **VIT_B))
            model = SiglipModel(cfg)
            proc = SiglipImageProcessorPil(size={"height": a["image"], "width": a["image"]})
        else:
            from transformers import Siglip2Config, Siglip2Model
            from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

            n = (a["image"] // a["patch"]) ** 2
            cfg = Siglip2Config(text_config=text, vision_config=dict(patch_size=a["patch"], num_patches=n, **VIT_B))
            model = Siglip2Model(cfg)
            proc = Siglip2ImageProcessorPil(patch_size=a["patch"], max_num_patches=n)
    model.eval()
    return DualEncoder(model, tok, proc, model_name=f"{a['id']} (random weights)", source="built locally",
                       model_identity=f"bench:{family}", meaningless=True, device="cpu")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--families", default="clip,siglip,siglip2")
    args = ap.parse_args()
    torch.set_num_threads(available_cpus())
    paths = sorted((SAMPLE / "images" / "image_train").glob("*.jpg"))[: args.images]
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    titles = pl.read_csv(SAMPLE / "X_sample.csv", infer_schema=False)["designation"].to_list()[: args.texts]
    cpu = cpu_model()
    print(f"CPU: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(images)} images, {len(titles)} titles (best of {args.repeats}); random weights, real FLOPs")
    results: dict[str, dict] = {}
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        t0 = time.perf_counter()
        enc = build(family)
        built = time.perf_counter() - t0
        pixels = enc._preprocess(images)
        t_img = timed(lambda: enc._encode_pixel_batch(pixels), args.repeats)
        t_txt = timed(lambda: enc.encode_texts(titles, batch_size=64), args.repeats)
        out = enc.encode_texts(titles[:2])
        assert out.dtype == np.float32 and out.shape == (2, enc.dim)
        params = sum(p.numel() for p in enc.model.parameters())
        r = {"checkpoint": ARCHS[family]["id"], "family": enc.family, "dim": enc.dim, "image_size": enc.image_size,
             "max_text_length": enc.max_text_length, "params_m": round(params / 1e6, 1),
             "images_per_s": round(len(images) / t_img, 2), "texts_per_s": round(len(titles) / t_txt, 1),
             "build_s": round(built, 1)}
        results[family] = r
        print(f"{family:8s} {r['checkpoint']:45s} dim {r['dim']:4d} image {r['image_size']} text {r['max_text_length']:3d}"
              f" params {r['params_m']:6.1f}M  images/s {r['images_per_s']:7.2f}  texts/s {r['texts_per_s']:7.1f}",
              flush=True)
        del enc
    if "clip" in results:
        base = results["clip"]
        for family, r in results.items():
            r["images_speed_vs_clip"] = round(r["images_per_s"] / base["images_per_s"], 3)
            r["texts_speed_vs_clip"] = round(r["texts_per_s"] / base["texts_per_s"], 3)
            if family != "clip":
                print(f"{family} vs clip (same process): images {r['images_speed_vs_clip']:.2f}x, "
                      f"texts {r['texts_speed_vs_clip']:.2f}x the speed; embedding {r['dim']} vs {base['dim']} dims "
                      f"({r['dim'] / base['dim']:.1f}x the index memory)")
    print("RESULT " + json.dumps({"cpu": cpu, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                                  "images": len(images), "texts": len(titles), "families": results}))


if __name__ == "__main__":
    main()
