"""Text queries → caption vectors, by one of several runtimes, with a bounded cache of recent queries.

A search query is one short caption (about 10 tokens), encoded alone or in a small batch. At that size the
ViT-B/32 text tower is a chain of skinny matrix products, where torch's eager dispatch and its generic GEMM
choices cost more than the arithmetic. So the same computation (``CLIP2Video.encode_text`` then
``text_vector``, on the batch's real tokens only) can run through:

- ``torch``: eager torch, fp32 (or ``--precision`` bf16/fp16 autocast): the reference, what
  ``infer_retrieval.py --save_sim`` computes;
- ``torch-int8``: eager torch with int8 weight-only dynamic quantisation of the linear layers;
- ``onnx`` / ``onnx-int8``: the text path exported to ONNX (ids and mask with dynamic batch and length axes)
  and run by ONNX Runtime (the int8 model: ONNX Runtime's dynamic quantisation of the weights), needs the
  ``onnxruntime`` package (``pip install 'clip2video[fast]'``);
- ``openvino`` / ``openvino-bf16``: the same ONNX graph compiled by OpenVINO for the CPU, in fp32 or with bf16
  inference precision (optional package ``openvino``).

What ``benchmarks/bench_search.py`` measured (``benchmarks/README.md``): ONNX Runtime and OpenVINO in fp32 give
the fp32 vectors to ~1e-7 in about half of eager torch's time for one query; no int8 path stays within cosine
0.9995 of fp32, and bf16 passes the cosine but not the same-top-10 test. So ``auto`` (``serve``'s default) takes
OpenVINO, else ONNX Runtime, else torch (said once in the log), all fp32: its scores equal ``--save_sim`` to
float rounding whatever is installed, and a missing optional package never stops a server. ``query`` keeps
``torch`` by default: exporting the tower takes seconds, more than a one-off query saves.

``QueryCache`` keeps recent query vectors: bounded by bytes, least recently used out first, keyed by the
model fingerprint, the runtime's name and the query's token ids (the tokenizer's normalisation: case, spaces,
Unicode, truncation to ``max_words``), so a vector of another model or another runtime is never returned.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence

import numpy as np

from clip2video.modules.runtime.lru import BoundedLRU

logger = logging.getLogger("clip2video.search.text_encoder")

TEXT_ENCODERS = ("torch", "torch-int8", "onnx", "onnx-int8", "openvino", "openvino-bf16", "auto")
FAST_EXTRA = "pip install 'clip2video[fast]'"


class TextEncoderUnavailable(ValueError):
    """The runtime a ``--text_encoder`` names is not installed or cannot run this model (one line)."""


def _trim(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The batch cut after its last real position (``tokenizer.real_length``; exact under the causal mask)."""
    import torch

    from clip2video.modules.network.tokenizer import real_length

    keep = real_length(torch.from_numpy(ids), torch.from_numpy(mask))
    if 0 < keep < ids.shape[1]:
        ids, mask = ids[:, :keep], mask[:, :keep]
    return np.ascontiguousarray(ids), np.ascontiguousarray(mask)


class TextEncoder:
    """Texts → (n, D) float32 caption vectors ``[w·t_g, (1−w)·t_a]``; subclasses run the tower (``_run``).

    Thread-safe as far as the runtime is: torch modules and ONNX Runtime / OpenVINO sessions may be called from
    several threads at once.
    """

    name = "base"

    def __init__(self, tokenizer, dim: int):
        self.tokenizer = tokenizer
        self.dim = int(dim)

    def token_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int64 (n, max_words) of ``texts`` (the tokenizer's own padding)."""
        ids, mask = self.tokenizer.batch(list(texts))
        return ids.numpy(), mask.numpy()

    def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids, mask = _trim(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64))
        return np.ascontiguousarray(self._run(ids, mask), dtype=np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_ids(*self.token_ids(texts))

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def text_vector_module(model):
    """``model.encode_text`` + ``model.text_vector`` as one ``nn.Module`` of (ids, mask) without the real-length
    cut (the caller trims), so that it traces into one graph with dynamic batch and length axes."""
    import torch

    from clip2video.modules.network.alignment import align_tokens
    from clip2video.modules.network.temporal import l2n

    class TextVector(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            m = self.m
            tokens = m.text_tokens(ids)  # (B, L, D)
            glob = l2n(tokens[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)])  # end token
            if not m.config.use_tab:
                return glob
            tab_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, 1:]], dim=1)  # the start token is out
            aligned = align_tokens(tokens, tab_mask, m.weight_center, m.emb_center)
            w = m.config.center_weight
            return torch.cat([w * glob, (1 - w) * aligned], dim=-1)

    return TextVector(model)


class TorchTextEncoder(TextEncoder):
    """Eager torch: the model's own ``encode_text`` (fp32, or bf16/fp16 autocast with ``precision``)."""

    def __init__(self, model, tokenizer, dim: int, precision: str = "fp32"):
        super().__init__(tokenizer, dim)
        self.model = model
        self.precision = precision
        self.name = "torch" if precision == "fp32" else f"torch-{precision}"

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        from clip2video.modules.runtime.precision import autocast

        device = next(self.model.parameters()).device
        with torch.inference_mode(), autocast(device, self.precision):
            t = self.model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
            return self.model.text_vector(t).float().cpu().numpy()


class TorchInt8TextEncoder(TextEncoder):
    """Eager torch with int8 weight-only dynamic quantisation of the text path's linear layers (CPU)."""

    name = "torch-int8"

    def __init__(self, model, tokenizer, dim: int):
        super().__init__(tokenizer, dim)
        import torch

        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError as e:  # pragma: no cover - torch builds without quantisation
            raise TextEncoderUnavailable(f"--text_encoder torch-int8: this torch has no dynamic quantisation ({e})") \
                from None
        import warnings

        module = text_vector_module(_text_only(model)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes that this API moves to torchao
            self.module = quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()


def _text_only(model):
    """A CPU fp32 copy of ``model`` without its image tower (nothing of a text query reads it)."""
    import copy

    import torch

    visual = model.clip.visual
    model.clip.visual = torch.nn.Identity()
    try:
        text = copy.deepcopy(model)
    finally:
        model.clip.visual = visual
    return text.float().cpu().eval()


def export_onnx(model, opset: int = 17) -> bytes:
    """The text path of ``model`` (``text_vector_module``) as ONNX bytes; inputs ``ids`` and ``mask`` (int64, dynamic
    batch and length), output ``vector`` (batch, D). Traced on a 2 × 8 batch with the TorchScript exporter, which
    needs no package beyond torch."""
    import warnings

    import torch

    module = text_vector_module(_text_only(model)).eval()
    ids = torch.full((2, 8), 1, dtype=torch.long)
    ids[:, -1] = module.m.clip.vocab_size - 1
    mask = torch.ones_like(ids)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes about the length check, which the trim keeps true
        torch.onnx.export(module, (ids, mask), buf, input_names=["ids", "mask"], output_names=["vector"],
                          dynamic_axes={"ids": {0: "batch", 1: "length"}, "mask": {0: "batch", 1: "length"},
                                        "vector": {0: "batch"}}, opset_version=opset, dynamo=False)
    return buf.getvalue()


def quantize_onnx(model_bytes: bytes) -> bytes:
    """ONNX Runtime's dynamic quantisation: int8 weights (per output channel), activations quantised per call."""
    import os
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="clip2video-onnx-") as tmp:
        src, dst = os.path.join(tmp, "text.onnx"), os.path.join(tmp, "text-int8.onnx")
        with open(src, "wb") as f:
            f.write(model_bytes)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
        with open(dst, "rb") as f:
            return f.read()


class OnnxTextEncoder(TextEncoder):
    """The exported text path run by ONNX Runtime (``int8``: its dynamically quantised copy)."""

    def __init__(self, model, tokenizer, dim: int, *, int8: bool = False, threads: int | None = None,
                 model_bytes: bytes | None = None):
        super().__init__(tokenizer, dim)
        self.name = "onnx-int8" if int8 else "onnx"
        try:
            import onnxruntime as ort
        except ImportError:
            raise TextEncoderUnavailable(f"--text_encoder {self.name} needs onnxruntime: {FAST_EXTRA}") from None
        data = model_bytes if model_bytes is not None else export_onnx(model)
        if int8:
            data = quantize_onnx(data)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or _torch_threads()
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no spin-wait on a shared CPU
        self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.session.run(["vector"], {"ids": ids, "mask": mask})[0]


class OpenVinoTextEncoder(TextEncoder):
    """The exported ONNX text path compiled by OpenVINO for the CPU (fp32 inference precision)."""

    name = "openvino"

    def __init__(self, model, tokenizer, dim: int, *, threads: int | None = None, model_bytes: bytes | None = None,
                 precision: str = "f32"):
        super().__init__(tokenizer, dim)
        try:
            import openvino as ov
        except ImportError:
            raise TextEncoderUnavailable("--text_encoder openvino needs the openvino package: pip install openvino") \
                from None
        data = model_bytes if model_bytes is not None else export_onnx(model)
        core = ov.Core()
        ov_model = core.read_model(data)  # ONNX bytes
        cfg = {"INFERENCE_NUM_THREADS": threads or _torch_threads(), "INFERENCE_PRECISION_HINT": precision,
               "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(ov_model, "CPU", cfg)
        if precision != "f32":
            self.name = f"openvino-{precision}"
        self._local = threading.local()

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        req = getattr(self._local, "req", None)
        if req is None:  # one infer request per thread (a request is not re-entrant)
            req = self._local.req = self.compiled.create_infer_request()
        out = req.infer({"ids": ids, "mask": mask})
        return np.array(next(iter(out.values())), copy=True)


def _torch_threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


def make_text_encoder(name: str, model, tokenizer, dim: int, *, precision: str = "fp32",
                      threads: int | None = None) -> TextEncoder:
    """The encoder ``name`` (:data:`TEXT_ENCODERS`) over ``model``; ``auto``: ONNX Runtime fp32 when installed,
    else torch (logged). TextEncoderUnavailable (a ValueError, one line) when a named runtime is missing."""
    if name not in TEXT_ENCODERS:
        raise TextEncoderUnavailable(f"--text_encoder must be one of {', '.join(TEXT_ENCODERS)}, got {name!r}")
    if name == "auto":
        missing = []
        for make in (lambda: OpenVinoTextEncoder(model, tokenizer, dim, threads=threads),
                     lambda: OnnxTextEncoder(model, tokenizer, dim, threads=threads)):
            try:
                return make()
            except TextEncoderUnavailable as e:
                missing.append(str(e).split(": ", 1)[-1])
        logger.info("text encoder: torch (neither openvino nor onnxruntime is installed: %s)", FAST_EXTRA)
        return TorchTextEncoder(model, tokenizer, dim, precision)
    if name == "torch":
        return TorchTextEncoder(model, tokenizer, dim, precision)
    if name == "torch-int8":
        return TorchInt8TextEncoder(model, tokenizer, dim)
    if name in ("onnx", "onnx-int8"):
        return OnnxTextEncoder(model, tokenizer, dim, int8=name == "onnx-int8", threads=threads)
    return OpenVinoTextEncoder(model, tokenizer, dim, threads=threads,
                               precision="bf16" if name == "openvino-bf16" else "f32")


# ----------------------------------------------------------------------------------------------- cache
class QueryCache(BoundedLRU):
    """Recent query vectors, least recently used out first, at most ``max_bytes`` (vectors + keys + a fixed
    per-entry overhead). Keys are ``(fingerprint, encoder name, token ids)``. ``max_bytes`` 0 keeps nothing.
    Stored vectors are read-only copies: a caller cannot change what another will get."""

    what = "query cache size (bytes)"
    ENTRY_OVERHEAD = 200  # bytes per entry beyond the vector and the ids (dict slot, tuple, array header)

    @staticmethod
    def key(fingerprint: str, encoder: str, ids: np.ndarray, mask: np.ndarray) -> tuple:
        """The real tokens of one query (padding dropped, so the key does not depend on ``max_words``' padding)."""
        real = np.asarray(ids, dtype=np.int64)[np.asarray(mask) != 0]
        return fingerprint, encoder, real.tobytes()

    def _size(self, key: tuple, vec: np.ndarray) -> int:
        return vec.nbytes + len(key[2]) + len(key[0]) + len(key[1]) + self.ENTRY_OVERHEAD

    cost = _size

    def put(self, key: tuple, vec: np.ndarray) -> None:
        vec = np.array(vec, dtype=np.float32, copy=True)
        vec.setflags(write=False)
        super().put(key, vec)


def encode_cached(encoder: TextEncoder, cache: QueryCache | None, fingerprint: str, texts: Sequence[str]) -> np.ndarray:
    """``encoder.encode(texts)`` with the cached vectors reused and only the rest encoded (in one batch)."""
    ids, mask = encoder.token_ids(texts)
    if cache is None or cache.max_bytes == 0:
        return encoder.encode_ids(ids, mask)
    keys = [QueryCache.key(fingerprint, encoder.name, r, m) for r, m in zip(ids, mask, strict=True)]
    out = np.empty((len(keys), encoder.dim), dtype=np.float32)
    todo = []
    for i, k in enumerate(keys):
        v = cache.get(k)
        if v is None:
            todo.append(i)
        else:
            out[i] = v
    if todo:
        got = encoder.encode_ids(ids[todo], mask[todo])
        if got.shape[1] != encoder.dim:
            raise ValueError(f"the model gives {got.shape[1]}-d vectors, the index holds {encoder.dim}-d")
        for j, i in enumerate(todo):
            out[i] = got[j]
            cache.put(keys[i], got[j])
    return out


__all__ = ["TEXT_ENCODERS", "OnnxTextEncoder", "OpenVinoTextEncoder", "QueryCache", "TextEncoder",
           "TextEncoderUnavailable", "TorchInt8TextEncoder", "TorchTextEncoder", "encode_cached", "export_onnx",
           "make_text_encoder", "quantize_onnx"]
