"""Query encoding through ONNX Runtime (CPU): the served model's text tower exported at start-up, int8 when faithful.

Why: on a small CPU the text tower is most of a search request; ORT runs the same graph with less per-call
overhead than eager torch, and its dynamic int8 MatMuls are faster still. Only the query side changes.

* Export: a wrapper module around the encoder's own ``_text_forward`` (the family adapter: CLIP, SigLIP,
  SigLIP 2 alike) + L2 normalisation, with the inputs the family's tokenizer produces (``input_ids`` and, when
  the adapter uses it, ``attention_mask``); dynamic batch and sequence axes. Exported from the *loaded* model, so
  what is exported is exactly what is served: by torch.export (torch's default ONNX exporter since 2.9; symbolic
  shapes, eager attention: ~35% fewer nodes in the int8 graph), else by the legacy TorchScript exporter
  (deprecated in torch).
  Speed is about the same (benchmarks/results/bench_text_export.txt: 1.04x for one query, 1.0x batched); the
  point is not to depend on the deprecated exporter, with it kept as the fallback. torch.export is slower to run
  (full-size CLIP text tower: 11.4 s vs 1.8 s), once per cache key.
* Cache: the fp32 and int8 graphs are kept under ``CURATION_MODEL_CACHE/onnx-text/<key>/``, key = sha256 of the
  encoder's ``model_identity`` (local directories by file contents, Hub models by commit + config) + the torch /
  transformers / onnxruntime versions + the export settings; written to a temporary directory and renamed into
  place (atomic: concurrent start-ups never read half a file). A cache that cannot be read or written is skipped.
* Two int8 graphs. *Static* int8 (activation ranges calibrated once on ``CALIBRATION_QUERIES``, per-channel int8
  weights, QOperator): each query's embedding is independent of its batch neighbours, so queries are micro-batched
  (measured on 2 cores, full-size ViT-B/32 text tower, ~9 tokens: 3.8 ms/query in batches of 8-16 vs 5.6 ms one
  at a time). *Dynamic* int8 (activation scales computed per run over the whole batch): one query per run.
* Choice, by capability and fidelity only (never by timing): a probe of real-looking queries
  (api.quantize.PROBE_QUERIES, held out from the calibration set) is embedded by torch fp32 and by ORT, one at a
  time and (static int8) as one batch; the first of static int8, dynamic int8 (both when int8 is allowed:
  CURATION_API_TEXT_INT8 != off), fp32 ORT whose min cosine to torch fp32 reaches ``MIN_COSINE_INT8`` (int8) /
  ``MIN_COSINE_FP32`` (fp32) is served, else the torch path (which may still apply its own int8 tower).
* Threads: ``intra_op_num_threads`` = the per-forward thread count (CURATION_API_TORCH_THREADS), inter-op 1, no
  spin-waiting (spinning threads steal the cores from the other workers on a busy machine). One session is shared
  by the service's encode workers (``InferenceSession.run`` is thread-safe).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from api.quantize import PROBE_QUERIES, quantize_text_tower

log = logging.getLogger("api")

MIN_COSINE_INT8 = 0.99
MIN_COSINE_FP32 = 0.9999
OPSET = 17  # TorchScript exporter
DYNAMO_OPSET = 18  # torch.export exporter (its lowest well-supported opset)
EXPORT_VERSION = 4  # bump when the exported graphs change (part of the cache key); 2: + static int8; 3: attention
# products float; 4: torch.export (dynamo) exporter, eager attention
# Static int8 calibration texts: queries and catalogue titles of several lengths (French and English), disjoint
# from the fidelity probe (api.quantize.PROBE_QUERIES) so that the probe judges texts the ranges were not fitted on.
CALIBRATION_QUERIES = [
    "chaise de bureau ergonomique", "tapis de salon gris", "poupée", "robot aspirateur", "lego technic",
    "casque audio sans fil bluetooth", "bougie parfumée vanille", "livre de recettes italiennes",
    "figurine dragon ball z 20 cm", "sac à dos randonnée 40 litres imperméable", "peluche lapin bébé doux",
    "set de 6 verres à vin en cristal", "stickers muraux chambre enfant étoiles", "manette ps4",
    "Nintendo Switch Mario Kart 8 Deluxe", "carte graphique", "tente de camping 4 places", "pot de fleurs",
    "kids toy car", "red summer dress", "blue ceramic coffee mug", "board game for family night",
    "Tondeuse à gazon électrique 1600 W, largeur de coupe 38 cm, bac de ramassage 45 L",
    "Coffret de 24 feutres de coloriage lavables pour enfants à partir de 3 ans, pointe moyenne",
    "Revue Spirou n° 3456 de 2004, bon état, quelques traces d'usage sur la couverture",
    "Housse de couette 220x240 cm en percale de coton, deux taies d'oreiller assorties, coloris bleu nuit",
    "Jeu de société coopératif pour 2 à 6 joueurs, parties de 30 minutes, règles en français, dès 8 ans",
    "Lampe de bureau LED à intensité variable avec port de charge USB et bras articulé " * 2,
    "Parasol déporté 3 x 3 m avec manivelle, toile en polyester traitée anti-UV, pied croisé inclus " * 3,
    "z", "12", "XXL",
]
BACKENDS = ("auto", "onnx", "torch")


class OnnxExportError(RuntimeError):
    """The text tower could not be exported / loaded into ONNX Runtime."""


@dataclass(frozen=True)
class TextBackend:
    """What the service encodes queries with."""

    encode: Callable[[list[str]], np.ndarray]
    description: str  # shown as ``text_encoder`` in /readyz and /stats
    batchable: bool  # False: one query per forward (int8: activation scales depend on the batch)
    backend: str  # "onnx" | "torch"


# ------------------------------------------------------------------------------------------------ export


def _versions() -> str:
    import onnxruntime
    import torch
    import transformers

    try:  # the torch.export exporter's translator: a graph made without it (TorchScript) is not reused once it is there
        from importlib.metadata import version

        onnxscript = version("onnxscript")
    except Exception:  # noqa: BLE001 - not installed
        onnxscript = "absent"
    return (f"torch {torch.__version__}|transformers {transformers.__version__}|ort {onnxruntime.__version__}"
            f"|onnxscript {onnxscript}")


def cache_key(encoder: Any) -> str:
    identity = str(getattr(encoder, "model_identity", "") or "")
    raw = f"{identity}|{_versions()}|opset {OPSET}|export {EXPORT_VERSION}|mask {bool(encoder._text_mask)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _input_names(encoder: Any) -> list[str]:
    return ["input_ids", "attention_mask"] if encoder._text_mask else ["input_ids"]


EXPORTERS = ("torch.export", "TorchScript")


@contextlib.contextmanager
def _eager_attention(model: Any):
    """The model's attention as plain ops while it is exported, then as it was.

    Why: SDPA exports as a guarded sub-graph (IsNaN/Where per layer for fully masked rows); the eager attention
    is plain MatMul/Softmax. Same maths (the probe checks it)."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    switched = False
    if before not in (None, "eager") and callable(switch):
        try:
            switch("eager")
            switched = True
        except Exception as exc:  # noqa: BLE001 - a family without the switch exports its own attention
            log.info("ONNX export keeps %s attention: %s", before, exc)
    try:
        yield
    finally:
        if switched:
            try:
                switch(before)
            except Exception as exc:  # noqa: BLE001 - eager is the same maths; never hide the export's own error
                log.warning("attention implementation not restored to %s after the ONNX export: %s", before, exc)


def _text_tower_module(encoder: Any):
    import torch
    import torch.nn.functional as F

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = encoder.model  # registered so that its weights are the graph's initializers

        def forward(self, input_ids, attention_mask=None):
            return F.normalize(encoder._text_forward(input_ids, attention_mask).float(), dim=-1)

    return TextTower().eval()


def _export_dynamo(encoder: Any, path: Path, args: tuple, names: list[str]) -> None:
    """torch.export-based exporter (onnxscript): shapes are symbolic, so the graph carries no Shape/Gather/Concat
    chain per reshape (full-size CLIP text tower, static int8: 551 nodes vs 843 from TorchScript)."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=max(2, int(encoder.max_text_length)))
    shapes = {n: {0: batch, 1: seq} for n in names}
    with _eager_attention(encoder.model):
        torch.onnx.export(_text_tower_module(encoder), args, str(path), dynamo=True, dynamic_shapes=shapes,
                          input_names=names, output_names=["text_embeds"], opset_version=DYNAMO_OPSET,
                          external_data=False, verbose=False)


def _export_torchscript(encoder: Any, path: Path, args: tuple, names: list[str]) -> None:
    import torch

    axes = {n: {0: "batch", 1: "seq"} for n in names}
    axes["text_embeds"] = {0: "batch"}
    kwargs = {"input_names": names, "output_names": ["text_embeds"], "dynamic_axes": axes, "opset_version": OPSET}
    try:
        torch.onnx.export(_text_tower_module(encoder), args, str(path), dynamo=False, **kwargs)
    except TypeError as exc:  # torch < 2.5: no ``dynamo`` argument (the TorchScript exporter is the default)
        if "dynamo" not in str(exc):
            raise
        torch.onnx.export(_text_tower_module(encoder), args, str(path), **kwargs)


def export_text_tower(encoder: Any, path: Path) -> str:
    """Export the encoder's text forward (projected, L2-normalised features) to ``path``; returns how.

    torch.export first; the TorchScript exporter when that fails (onnxscript missing, a model torch.export cannot
    trace) - slower graphs, same maths; the probe judges either."""
    import torch

    names = _input_names(encoder)
    toks = encoder._tokenize(PROBE_QUERIES[:2], return_tensors="pt",
                             **encoder.adapter.text_kwargs(encoder.max_text_length))
    args = tuple(toks[n].to("cpu") for n in names)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings, exporter notices
        try:
            _export_dynamo(encoder, path, args, names)
            return "torch.export"
        except Exception as exc:  # noqa: BLE001 - any failure of the newer exporter: the older one
            log.warning("torch.export ONNX export failed (%s: %s); using the legacy TorchScript exporter (cached "
                        "for this model and these library versions)", type(exc).__name__, str(exc)[:300])
            path.unlink(missing_ok=True)
        _export_torchscript(encoder, path, args, names)
        return "TorchScript"


class _DropPreprocessHint(logging.Filter):
    """onnxruntime.quantization logs 'Please consider to run pre-processing before quantization' on the root
    logger at every quantization; the probe judges the result, so the hint is noise in the service's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer():
    """Silence the quantizer's warnings and its pre-processing hint (on the root logger and its handlers)."""
    hint = _DropPreprocessHint()
    root = logging.getLogger()
    handlers = list(root.handlers)
    root.addFilter(hint)
    for h in handlers:
        h.addFilter(hint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(hint)
        for h in handlers:
            h.removeFilter(hint)


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


class _CalibrationReader:
    """Feeds the calibration texts one at a time (as served) to onnxruntime's calibrator."""

    def __init__(self, encoder: Any, names: list[str]):
        kwargs = encoder.adapter.text_kwargs(encoder.max_text_length)
        self._feeds = iter([{n: np.asarray(toks[n], dtype=np.int64) for n in names}
                            for toks in (encoder._tokenize([t], return_tensors="np", **kwargs)
                                         for t in CALIBRATION_QUERIES)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # the calibrator reads the data once
        pass


def _activation_matmuls(path: Path) -> list[str]:
    """The MatMuls with no weight operand (attention's Q·K and scores·V): they stay float. Quantizing both operands
    of a tiny product with calibrated ranges costs more quantize/dequantize work than it saves and loses fidelity
    (full-size ViT-B/32 text tower, 2 cores: ~4% faster per query, probe min cosine 0.9981 -> 0.9989)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)]


def quantize_static_int8(src: Path, dst: Path, encoder: Any) -> None:
    """int8 MatMuls with activation ranges calibrated on CALIBRATION_QUERIES (MinMax), per-channel weights."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:
        with _quiet_quantizer():
            try:  # shape inference + graph clean-up, as onnxruntime recommends before quantizing
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
                model_in = pre
            except Exception as exc:  # noqa: BLE001 - the plain export quantizes too
                log.info("ONNX pre-processing skipped before static int8: %s", exc)
                model_in = src
            quantize_static(str(model_in), str(dst), _CalibrationReader(encoder, _input_names(encoder)),
                            quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                            op_types_to_quantize=["MatMul"], nodes_to_exclude=_activation_matmuls(model_in))
    finally:
        pre.unlink(missing_ok=True)


EXPORT_INFO = "export.json"  # next to the graphs: which exporter made them (shown in /stats)


def _exporter_of(directory: Path) -> str:
    try:
        exporter = json.loads((directory / EXPORT_INFO).read_text()).get("exporter")
    except (OSError, ValueError, AttributeError):
        return "exporter unknown"
    return exporter if exporter in EXPORTERS else "exporter unknown"


def _cache_root() -> Path:
    from curation_dagster.core.settings import model_cache_dir

    return model_cache_dir() / "onnx-text"


@dataclass(frozen=True)
class Graphs:
    """The text tower's ONNX graphs (int8 ones None when int8 is not wanted) and where they came from."""

    fp32: Path
    int8_static: Path | None
    int8_dynamic: Path | None
    where: str


def _graphs(final: Path, want_int8: bool, where: str) -> Graphs:
    return Graphs(final / "text_fp32.onnx", final / "text_int8_static.onnx" if want_int8 else None,
                  final / "text_int8.onnx" if want_int8 else None, where)


def prepare_graphs(encoder: Any, want_int8: bool, cache_root: Path | None = None) -> Graphs:
    """fp32 + static and dynamic int8 graphs, cached by model identity; built atomically."""
    root = cache_root or _cache_root()
    final = root / cache_key(encoder)
    names = ("text_fp32.onnx", "text_int8_static.onnx", "text_int8.onnx")
    if all((final / n).is_file() for n in names):
        log.info("ONNX text graphs: cached in %s", final)
        return _graphs(final, want_int8, f"cached {final.name}, {_exporter_of(final)} graph")
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        where = f"exported to cache entry {final.name}"
    except OSError:  # read-only cache: export into a private temporary directory, used for this process only
        work = Path(tempfile.mkdtemp(prefix="onnx-text-"))
        final = work
        where = "exported to a private temporary directory (cache dir not writable)"
    try:
        exporter = export_text_tower(encoder, work / "text_fp32.onnx")
        (work / EXPORT_INFO).write_text(json.dumps({"exporter": exporter}))
        where = f"{where}, {exporter} graph"
        quantize_int8(work / "text_fp32.onnx", work / "text_int8.onnx")  # small next to the export; cached with it
        quantize_static_int8(work / "text_fp32.onnx", work / "text_int8_static.onnx", encoder)
    except BaseException:
        if work != final:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if work != final:
        try:
            os.replace(work, final)  # atomic; fails if another process published the same key meanwhile
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
            if not all((final / n).is_file() for n in names):
                raise
            where = f"cached {final.name} (published by another process meanwhile), {_exporter_of(final)} graph"
    log.info("ONNX text graphs: %s (in %s)", where, final)  # the path for the operator's log, not for /readyz
    return _graphs(final, want_int8, where)


# ------------------------------------------------------------------------------------------------ running


class OrtTextEncoder:
    """Tokenize with the encoder's tokenizer (as the family was trained), run the ORT graph; float32 unit vectors."""

    def __init__(self, encoder: Any, model_path: Path, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self.path = model_path
        self._encoder = encoder
        self._names = [i.name for i in self.session.get_inputs()]
        self._text_kwargs = encoder.adapter.text_kwargs(encoder.max_text_length)
        self.dim = int(encoder.dim)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = [t if isinstance(t, str) else "" if t is None else str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        toks = self._encoder._tokenize(texts, return_tensors="np", **self._text_kwargs)
        feed = {n: np.asarray(toks[n], dtype=np.int64) for n in self._names}
        out = np.asarray(self.session.run(None, feed)[0], dtype=np.float32)
        if out.shape != (len(texts), self.dim):
            raise RuntimeError(f"ONNX text tower returned shape {out.shape}, expected ({len(texts)}, {self.dim})")
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)  # already unit; guards rounding
        return out


def torch_reference(encoder: Any, texts: Sequence[str]) -> np.ndarray:
    """The torch fp32 embedding of each text alone (no autocast, no int8: call before any quantization)."""
    import torch

    rows = []
    kwargs = encoder.adapter.text_kwargs(encoder.max_text_length)
    for t in texts:
        toks = encoder._tokenize([t], return_tensors="pt", **kwargs)
        mask = toks["attention_mask"] if encoder._text_mask and "attention_mask" in toks else None
        with torch.inference_mode():
            rows.append(encoder._finish(encoder._text_forward(toks["input_ids"], mask).float()))
    return np.concatenate(rows)


def probe_cosine(ort_enc: OrtTextEncoder, ref: np.ndarray, batched: bool = False) -> float:
    """Min cosine to the torch fp32 reference over the probe, one query per run, and also as one padded batch
    when the graph is to be served batched (its vectors must not depend on the neighbours)."""
    got = np.concatenate([ort_enc.encode_texts([q]) for q in PROBE_QUERIES])  # one at a time
    cos = float(np.min(np.sum(ref * got, axis=1)))
    if batched:
        cos = min(cos, float(np.min(np.sum(ref * ort_enc.encode_texts(PROBE_QUERIES), axis=1))))
    return cos


def _onnx_capability(encoder: Any) -> str | None:
    """Why ORT cannot be used for this encoder (None: it can)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime/onnx not installed ({exc.name}): pip install onnxruntime onnx"
    if getattr(encoder, "device", "cpu") != "cpu":
        return f"the encoder runs on {encoder.device} (the ONNX text path is for CPU)"
    for attr in ("model", "adapter", "_text_forward", "_tokenize", "_finish", "max_text_length", "_text_mask"):
        if not hasattr(encoder, attr):
            return f"the encoder exposes no text tower to export (no {attr})"
    return None


def onnx_text_backend(encoder: Any, *, int8: str = "auto", threads: int = 1,
                      cache_root: Path | None = None) -> tuple[TextBackend | None, str]:
    """The ORT backend if the export and the probe allow it, else (None, why not)."""
    why = _onnx_capability(encoder)
    if why:
        return None, why
    want_int8 = int8 != "off"
    try:
        ref = torch_reference(encoder, PROBE_QUERIES)
        graphs = prepare_graphs(encoder, want_int8, cache_root)
        try:
            return _pick_graph(encoder, graphs, ref, want_int8, threads)
        except Exception as exc:  # noqa: BLE001
            if not graphs.where.startswith("cached"):
                raise
            # A cached graph that does not load (truncated by a full disk, damaged) would otherwise send every
            # start to the torch path for good: it is set aside and exported once more.
            log.warning("cached ONNX text graphs in %s unusable (%s: %s): exporting again", graphs.fp32.parent,
                        type(exc).__name__, exc)
            _evict(graphs.fp32.parent)
            return _pick_graph(encoder, prepare_graphs(encoder, want_int8, cache_root), ref, want_int8, threads)
    except Exception as exc:  # noqa: BLE001 - any export / runtime failure means the torch path
        log.warning("ONNX text tower not used: %s: %s", type(exc).__name__, exc)
        return None, f"ONNX export/run failed: {type(exc).__name__}: {str(exc)[:300]}"


def _evict(directory: Path) -> None:
    """Move a cache entry aside in one rename (a process loading it meanwhile sees it whole or not at all)."""
    aside = directory.with_name(f".tmp-evicted-{directory.name}-{os.getpid()}")
    os.replace(directory, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _pick_graph(encoder: Any, graphs: Graphs, ref: np.ndarray, want_int8: bool,
                threads: int) -> tuple[TextBackend | None, str]:
    """The first graph (static int8, dynamic int8, fp32) whose probe stays within its cosine floor."""
    where = graphs.where
    tried: list[str] = []
    if graphs.int8_static is not None:
        enc8 = OrtTextEncoder(encoder, graphs.int8_static, threads)
        cos8 = probe_cosine(enc8, ref, batched=True)
        if cos8 >= MIN_COSINE_INT8:
            desc = (f"onnx int8 static (ONNX Runtime, calibrated int8; probe min cosine to torch fp32 {cos8:.4f} "
                    f">= {MIN_COSINE_INT8}, alone and batched; {threads} thread(s) per run, micro-batched; {where})")
            return TextBackend(enc8.encode_texts, desc, batchable=True, backend="onnx"), desc
        tried.append(f"static int8 probe min cosine {cos8:.4f} < {MIN_COSINE_INT8}")
    if graphs.int8_dynamic is not None:
        enc8 = OrtTextEncoder(encoder, graphs.int8_dynamic, threads)
        cos8 = probe_cosine(enc8, ref)
        if cos8 >= MIN_COSINE_INT8:
            # activation scales per run over the whole batch: a query's vector would depend on its neighbours
            desc = (f"onnx int8 dynamic (ONNX Runtime, dynamic int8; {'; '.join(tried)}; probe min cosine to "
                    f"torch fp32 {cos8:.4f} >= {MIN_COSINE_INT8}; {threads} thread(s) per query, one query per "
                    f"run; {where})")
            return TextBackend(enc8.encode_texts, desc, batchable=False, backend="onnx"), desc
        tried.append(f"dynamic int8 probe min cosine {cos8:.4f} < {MIN_COSINE_INT8}")
    if not want_int8:
        tried.append("int8 off (CURATION_API_TEXT_INT8=off)")
    fp32_path = graphs.fp32
    enc32 = OrtTextEncoder(encoder, fp32_path, threads)
    cos32 = probe_cosine(enc32, ref)
    if cos32 >= MIN_COSINE_FP32:
        desc = (f"onnx float32 (ONNX Runtime; {'; '.join(tried)}; fp32 probe min cosine {cos32:.5f}; "
                f"{threads} thread(s) per run; {where})")
        return TextBackend(enc32.encode_texts, desc, batchable=True, backend="onnx"), desc
    tried.append(f"fp32 probe min cosine {cos32:.5f} < {MIN_COSINE_FP32}")
    return None, "ONNX text tower not faithful: " + "; ".join(tried)


_setup_lock = threading.Lock()


def choose_text_backend(encoder: Any, backend: str = "auto", int8: str = "auto", threads: int = 1,
                        cache_root: Path | None = None) -> TextBackend:
    """The service's query encoder: ONNX Runtime (``auto``/``onnx``) when it works and is faithful, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"text backend must be one of {BACKENDS}; got {backend!r}")
    with _setup_lock:  # one export at a time in a process
        if backend == "torch":
            reason = "CURATION_API_TEXT_BACKEND=torch"
        else:
            ort_backend, reason = onnx_text_backend(encoder, int8=int8, threads=threads, cache_root=cache_root)
            if ort_backend is not None:
                log.info("text encoder: %s", ort_backend.description)
                return ort_backend
            if backend == "onnx":
                log.warning("CURATION_API_TEXT_BACKEND=onnx but %s: falling back to torch", reason)
        torch_desc = quantize_text_tower(encoder, int8)
        desc = f"{torch_desc} [torch backend: {reason}]"  # starts with "int8 dynamic" / "float32" / "unchanged"
        log.info("text encoder: %s", desc)
        return TextBackend(encoder.encode_texts, desc, batchable=not torch_desc.startswith("int8"), backend="torch")
