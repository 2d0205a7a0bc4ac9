"""Text encoders: the real all-MiniLM-L6-v2 offline (packed, padding stripped,
deterministic, meaningful), a tiny T5 saved locally and loaded offline, clear errors for a
missing T5, and the TextEmbeddings packing helpers."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from tests.helpers import assert_close

from mugv.text import TextEmbeddings, load_minilm, load_t5, load_text_encoder, minilm_path

CAPTIONS = ["a cat sleeps on a sofa", "A red sports car drives along a coastal road at sunset.", "rain"]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_minilm_real_embeddings_packed_and_offline(minilm):
    emb = minilm(CAPTIONS)
    want_lengths = minilm.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")["attention_mask"].sum(1)
    assert emb.states.shape == (int(want_lengths.sum()), 384) and minilm.dim == 384
    assert emb.cu_seqlens.dtype == torch.int32 and emb.cu_seqlens.tolist()[0] == 0
    assert emb.lengths.tolist() == want_lengths.tolist()
    assert emb.max_seqlen == int(want_lengths.max())
    # padding stripped: each caption's states equal encoding it alone (no padding at all)
    for text, part in zip(CAPTIONS, emb.split()):
        alone = minilm(text)
        assert alone.states.shape == part.shape
        assert_close(part, alone.states, scale=50)
    # deterministic
    assert torch.equal(minilm(CAPTIONS).states, emb.states)
    assert load_minilm() is minilm and load_text_encoder("minilm") is minilm  # cached


def test_minilm_embeddings_carry_meaning(minilm):
    """Mean-pooled, L2-normalized states (the sentence-transformers recipe): paraphrases are
    closer than unrelated sentences."""
    emb = minilm(["a kitten is sleeping on the couch", "a cat sleeps on a sofa", "the stock market fell sharply"])
    pooled = torch.stack([p.mean(0) for p in emb.split()])
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2


def test_text_embeddings_padded_round_trip_and_cat(minilm):
    emb = minilm(CAPTIONS)
    y, mask = emb.to_padded()
    assert y.shape == (3, emb.max_seqlen, 384) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == emb.lengths.tolist()
    assert torch.all(y[~mask] == 0)
    back = TextEmbeddings.from_padded(y[:, None], mask)
    assert torch.equal(back.states, emb.states) and torch.equal(back.cu_seqlens, emb.cu_seqlens)
    y8, _ = emb.to_padded(max_len=emb.max_seqlen + 3)
    assert y8.shape[1] == emb.max_seqlen + 3
    both = TextEmbeddings.cat([emb, emb])
    assert both.batch_size == 6 and both.cu_seqlens[-1] == 2 * emb.states.shape[0]
    with pytest.raises(ValueError, match="shorter than the longest"):
        emb.to_padded(max_len=1)
    with pytest.raises(TypeError, match="int32"):
        TextEmbeddings(emb.states, emb.cu_seqlens.long(), emb.max_seqlen)
    with pytest.raises(ValueError, match="end at total"):
        TextEmbeddings(emb.states[:-1], emb.cu_seqlens, emb.max_seqlen)
    with pytest.raises(ValueError, match="prefix"):
        TextEmbeddings.from_padded(y, torch.flip(mask, dims=[1]))
    with pytest.raises(TypeError, match="list of str"):
        minilm([1, 2])


def test_missing_t5_says_where_it_looked(tmp_path, monkeypatch):
    missing = tmp_path / "t5-v1_1-xxl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_t5(missing)
    monkeypatch.delenv("MUGV_T5_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="MUGV_T5_PATH"):
        load_t5()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_text_encoder("t5", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown text encoder"):
        load_text_encoder("clip")


def test_tiny_t5_loads_offline_from_a_local_dir(tmp_path, monkeypatch):
    """A randomly initialized 2-layer T5 encoder written to disk (with the MiniLM WordPiece
    tokenizer: any tokenizer works) goes through the real T5 loading path, offline."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    T5EncoderModel(cfg).save_pretrained(tmp_path)
    src = minilm_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    monkeypatch.setenv("MUGV_T5_PATH", str(tmp_path))
    before = os.environ.get("HF_HUB_OFFLINE")
    enc = load_t5(max_length=8)
    assert os.environ.get("HF_HUB_OFFLINE") == before  # offline only while loading
    assert enc.dim == 32 and enc.name == "t5"
    emb = enc(CAPTIONS)
    lengths = enc.tokenizer(CAPTIONS, max_length=8, truncation=True, padding="longest",
                            return_tensors="pt")["attention_mask"].sum(1)
    assert emb.lengths.tolist() == lengths.tolist() and max(emb.lengths.tolist()) == 8
    assert emb.states.shape == (int(lengths.sum()), 32)
    assert_close(emb.split()[2], enc("rain").states, scale=50)
