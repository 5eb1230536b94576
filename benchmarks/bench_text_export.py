"""The query text tower as ONNX Runtime runs it: the torch.export (dynamo) graph vs the TorchScript graph.

Why: api/onnx_text.py exports the served model's text tower at start-up. The TorchScript exporter (deprecated in
torch) traces every reshape as a Shape -> Gather -> Unsqueeze -> Concat chain and SDPA as a guarded sub-graph;
torch.export keeps shapes symbolic: fewer nodes (measured: a third fewer in the int8 graph). Whether that makes a
short query cheaper is what this measures (answer here: barely; most of the time is in the int8 GEMMs). It exports
the full-size ViT-B/32 text tower (random weights: the real FLOPs) both ways in one process, quantizes both as the
service does (static int8, calibrated), checks both with the service's fidelity probe, and times them interleaved
(best of --repeats rounds; one ORT thread, as served on 2 cores) on bench_search's random queries, one at a time
and in micro-batches.

    python benchmarks/bench_text_export.py [--repeats 5] [--queries 48]

Last line: RESULT {json}.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402

import bench_search as bs  # noqa: E402
from api import onnx_text  # noqa: E402
from api.quantize import PROBE_QUERIES  # noqa: E402
from curation_dagster.core.settings import model_cache_dir  # noqa: E402
from curation_dagster.core.system import cpu_model  # noqa: E402


def node_counts(path: Path) -> tuple[int, int]:
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    return len(nodes), sum(ops[o] for o in ("Shape", "Gather", "Unsqueeze", "Concat"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--queries", type=int, default=48)
    args = ap.parse_args()

    import torch

    from curation_dagster.core.encoder import ClipEncoder

    cpu = cpu_model()
    torch.set_num_threads(1)
    model_dir = bs.save_full_size_clip(model_cache_dir() / "bench-clip-vit-b32-random")
    enc = ClipEncoder.load(str(model_dir), "cpu", precision="fp32")
    print(f"machine: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
          f"full-size ViT-B/32 text tower (random weights), static int8 ONNX Runtime, 1 thread")
    ref = onnx_text.torch_reference(enc, PROBE_QUERIES)
    work = Path(tempfile.mkdtemp(prefix="bench-text-export-"))
    names = onnx_text._input_names(enc)
    toks = enc._tokenize(PROBE_QUERIES[:2], return_tensors="pt", **enc.adapter.text_kwargs(enc.max_text_length))
    example = tuple(toks[n] for n in names)
    graphs, out = {}, {"cpu_model": cpu, "cores": os.cpu_count(), "exporters": {}}
    for label, export in (("torch.export", onnx_text._export_dynamo), ("TorchScript", onnx_text._export_torchscript)):
        fp32 = work / f"{label}.fp32.onnx"
        t = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer / exporter notices
            export(enc, fp32, example, names)
        export_s = time.perf_counter() - t
        int8 = work / f"{label}.int8_static.onnx"
        onnx_text.quantize_static_int8(fp32, int8, enc)
        ort_enc = onnx_text.OrtTextEncoder(enc, int8, threads=1)
        nodes, shape_ops = node_counts(int8)
        cos = onnx_text.probe_cosine(ort_enc, ref, batched=True)
        graphs[label] = ort_enc
        out["exporters"][label] = {"export_s": round(export_s, 1), "nodes": nodes, "shape_ops": shape_ops,
                                   "probe_min_cosine": round(cos, 4)}
        print(f"   {label:12s} export {export_s:5.1f} s  int8 graph {nodes} nodes ({shape_ops} Shape/Gather/Unsqueeze/"
              f"Concat)  probe min cosine to torch fp32 {cos:.4f}  [{cpu}]", flush=True)
    rng = np.random.default_rng(5)
    queries = [bs.random_query(rng) for _ in range(args.queries)]
    for g in graphs.values():
        g.encode_texts(queries[:8])  # warm-up
    best = {label: {b: float("inf") for b in (1, 4, 8)} for label in graphs}
    for _ in range(args.repeats):  # interleaved: both graphs see the same machine state
        for label, g in graphs.items():
            for b in (1, 4, 8):
                t = time.perf_counter()
                for i in range(0, len(queries), b):
                    g.encode_texts(queries[i:i + b])
                best[label][b] = min(best[label][b], (time.perf_counter() - t) / len(queries) * 1e3)
    print("\n== ms per query (tokenizer included), best of", args.repeats, "interleaved rounds")
    for label in graphs:
        print(f"   {label:12s} " + "  ".join(f"batch {b}: {best[label][b]:5.2f}" for b in (1, 4, 8)) + f"  [{cpu}]")
    ratio = {b: best["TorchScript"][b] / best["torch.export"][b] for b in (1, 4, 8)}
    print("   TorchScript / torch.export: " + "  ".join(f"batch {b}: {ratio[b]:.2f}x" for b in (1, 4, 8)) + f"  [{cpu}]")
    for label in graphs:
        out["exporters"][label]["ms_per_query"] = {str(b): round(v, 2) for b, v in best[label].items()}
    out["speedup"] = {str(b): round(v, 3) for b, v in ratio.items()}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
