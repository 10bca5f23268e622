"""The files the server offers, made once per invocation, and the check that a copy is whole."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Corpus:
    folder: Path  # on the sshd; its path is also the remote path
    digests: dict[str, str]  # name -> sha256 hex

    @property
    def count(self) -> int:
        return len(self.digests)

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir())


def small_files(folder: Path, count: int, size: int, seed: int) -> Corpus:
    """``count`` files of ``size`` random bytes, named like IBKR's encrypted reports."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    digests = {}
    for i in range(count):
        name = f"U{1000000 + i}.Activity.20260901.20260930.xml.pgp"
        data = rng.randbytes(size)
        (folder / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return Corpus(folder, digests)


def big_file(folder: Path, size: int, seed: int) -> Corpus:
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    name = "U1234567.Trade_History.20260101.20261231.xml.pgp"
    digest = hashlib.sha256()
    with (folder / name).open("wb") as out:
        remaining = size
        while remaining:
            data = rng.randbytes(min(_CHUNK, remaining))
            out.write(data)
            digest.update(data)
            remaining -= len(data)
    return Corpus(folder, {name: digest.hexdigest()})


def problem_with_copy(corpus: Corpus, copy: Path) -> str | None:
    """None when ``copy`` holds exactly the corpus (names, sizes, sha256); else what differs."""
    if not copy.is_dir():
        return f"{copy} does not exist"
    found = {p.name: p for p in copy.iterdir()}
    missing = sorted(set(corpus.digests) - set(found))
    extra = sorted(set(found) - set(corpus.digests))
    if missing or extra:
        return (
            f"{copy}: {len(found)} files, expected {corpus.count}; "
            f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, expected in corpus.digests.items():
        path = found[name]
        source_size = (corpus.folder / name).stat().st_size
        if path.stat().st_size != source_size:
            return f"{path}: {path.stat().st_size} bytes, expected {source_size}"
        if _sha256(path) != expected:
            return f"{path}: content differs from the original"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
