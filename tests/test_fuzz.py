"""Step 13: property tests over what users hand maskedlm: config values and files, and corpus files.
Whatever arrives, the answer is a result or one UserError line, never another exception (the CLI turns a
UserError into one line on stderr and exit 2)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from maskedlm import Config, UserError
from maskedlm.config import SECTIONS, DataConfig, load_config_file
from maskedlm.corpus import FingerprintCache, ReadStats, unit_pieces, units

# Derandomised: CI sees the same 300 cases every run (a failure there is a bug, never a flake).
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-3, 8) | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["", "auto", "mlm", "bert", "1e-3", "64:0.5"])
           | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=6)
FIELDS = [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def one_line(e: UserError) -> None:
    assert str(e) and "\n" not in str(e), repr(str(e))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=4))
def test_any_setting_is_taken_or_refused_in_one_line(changes):
    d = Config().to_dict()
    for (section, name), value in changes:
        d[section][name] = value
    try:
        cfg = Config.from_dict(d)
        cfg.validate()
        again = Config.from_dict(cfg.resolved().to_dict(), allow_derived=True)  # what a run saves, read back
    except UserError as e:
        one_line(e)
        return
    assert again.model == cfg.model and again.mask == cfg.mask


@FUZZ
@given(values)
def test_any_config_document_is_taken_or_refused_in_one_line(doc):
    try:
        Config().update(doc, source="fuzz.yaml")
    except UserError as e:
        one_line(e)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode), st.sampled_from([".json", ".yaml", ".toml", ".txt"]))
def test_any_config_file_is_read_or_refused_in_one_line(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"run{suffix}"
        path.write_bytes(data)
        try:
            cfg = Config()
            cfg.update(load_config_file(path), source=str(path))
            cfg.validate()
        except UserError as e:
            one_line(e)


json_lines = (st.binary(max_size=60)
              | values.map(lambda v: json.dumps(v).encode())
              | values.map(lambda v: json.dumps({"text": v}).encode())
              | st.text(max_size=40).map(lambda t: json.dumps({"text": t}).encode())
              | st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n))


@FUZZ
@given(st.lists(json_lines, max_size=6), st.sampled_from([".jsonl", ".txt", ".md", ".jsonl.gz", ".txt.gz", ".parquet"]),
       st.booleans(), st.sampled_from(["blank_line", "file"]), st.booleans())
@example([b"\xc2"], ".txt", True, "file", False)  # found by this test: UTF-8 cut short at the end, --strict-utf8
def test_any_corpus_file_is_read_or_refused_in_one_line(lines, suffix, strict, boundary, compress):
    data = b"\n".join(lines)
    if suffix.endswith(".gz") and compress:
        data = gzip.compress(data)  # else: a .gz that is not gzip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"corpus{suffix}"
        path.write_bytes(data)
        cfg = DataConfig(strict_utf8=strict, doc_boundary=boundary)
        try:
            for unit in units([str(path)], FingerprintCache(Path(tmp) / "fp.json")):
                for piece in unit_pieces(unit, cfg, ReadStats()):
                    assert isinstance(piece.text, str) and piece.text
        except UserError as e:
            one_line(e)


@pytest.mark.parametrize("name", ["state.json", "dataset_info.json", "dataset_dict.json"])
@FUZZ
@given(data=st.binary(max_size=80) | values.map(lambda v: json.dumps(v).encode()))
@example(data=b"\x80")  # found by this test: a state.json that is not UTF-8
@example(data=b"0")  # found by this test: datasets' TypeError on a state.json that is not a mapping
def test_any_datasets_folder_is_read_or_refused_in_one_line(name, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ds"
        folder.mkdir()
        for f in ("state.json", "dataset_info.json") if name != "dataset_dict.json" else ():
            (folder / f).write_text("{}")
        (folder / name).write_bytes(data)
        (folder / "data-00000-of-00001.arrow").write_bytes(data)
        try:
            for unit in units([str(folder)], FingerprintCache(Path(tmp) / "fp.json")):
                list(unit_pieces(unit, DataConfig(), ReadStats()))
        except UserError as e:
            one_line(e)
