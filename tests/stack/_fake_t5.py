"""A deterministic stand-in for the T5 text encoder, light to import (the spawned ranks of the
parallel-sampling tests use it)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from mugv.text import TextEmbeddings

TEXT_DIM = 32
PROMPT = "a red fox runs through fresh snow at dawn"


class FakeT5:
    """Deterministic stand-in for T5: per caption ``len(words)`` tokens (at most 12) of states drawn
    from a hash of the caption. ``__call__`` is the mugv encoder interface, ``encode`` the public one
    (padded to 12, with a mask)."""

    L = 12

    def _states(self, text):
        n = min(len(text.split()), self.L)
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return torch.randn(n, TEXT_DIM, generator=torch.Generator().manual_seed(seed))

    def __call__(self, texts):
        parts = [self._states(t) for t in texts]
        cu = torch.tensor([0] + np.cumsum([p.shape[0] for p in parts]).tolist(), dtype=torch.int32)
        return TextEmbeddings(torch.cat(parts), cu, max(p.shape[0] for p in parts))

    def encode(self, texts):
        y = torch.zeros(len(texts), 1, self.L, TEXT_DIM)
        mask = torch.zeros(len(texts), self.L, dtype=torch.long)
        for i, t in enumerate(texts):
            s = self._states(t)
            y[i, 0, :s.shape[0]], mask[i, :s.shape[0]] = s, 1
        return y, mask

