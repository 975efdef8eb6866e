"""Plain-text corpora: a UTF-8 file or a folder of them, split into documents at blank lines."""

from __future__ import annotations

import re
from pathlib import Path


class CorpusError(ValueError):
    """A corpus that cannot be used, naming the file."""


def read_text_file(path: Path) -> str:
    """Returns the file's text, refusing empty, binary and non-UTF-8 files with the file named."""
    data = path.read_bytes()
    if not data.strip():
        raise CorpusError(f"corpus file {path} is empty")
    if b"\x00" in data[:65536]:
        raise CorpusError(f"corpus file {path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"corpus file {path} is not valid UTF-8 (byte {err.start}: {err.reason})") from None


def split_documents(text: str) -> list[str]:
    """Splits text at blank lines and folds inner line breaks into spaces."""
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]


def read_corpus(path: str | Path) -> list[str]:
    """Returns the documents of a text file, or of every *.txt file in a folder (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"corpus folder {path} holds no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise CorpusError(f"corpus file {path} does not exist; point --config.data.source at a UTF-8 file or folder, "
                          f"or use the generated stories with --config.data.source=stories")
    documents = []
    for file in files:
        documents += split_documents(read_text_file(file))
    return documents


def read_hf_dataset(name: str, split: str = "train", field: str = "text", limit: int = 0) -> list[str]:
    """Returns texts from a Hugging Face dataset by name (needs `datasets` installed and a network)."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"data.source 'hf:{name}' needs the optional `datasets` package (pip install datasets)") from None
    rows = datasets.load_dataset(name, split=split)
    texts = [row[field] for row in (rows.select(range(min(limit, len(rows)))) if limit else rows)]
    return [t for t in texts if t and t.strip()]
