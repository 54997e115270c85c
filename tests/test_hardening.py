"""Step 13 (first part): hostile or damaged input gets one line and exit 2; the server refuses what it should;
a resumed run records every step once; the final checkpoint comes before the final evaluation."""

from __future__ import annotations

import json
from pathlib import Path
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from maskedlm import UserError, pretrain
from maskedlm.checkpoint import find_checkpoint, read_state
from maskedlm.cli import main
from maskedlm.serve import make_server

from .conftest import tiny_config


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    tmp = tmp_path_factory.mktemp("hardening")
    cfg = tiny_config(tmp, [str(corpus_dir)], max_steps=6, checkpoint_every=3, eval_every=0, log_every=1,
                      precision="fp32")
    return pretrain(cfg, log=quiet, progress_bar=False).run_dir


def cli_error(capsys, *args) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr and no traceback."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("maskedlm: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", "train.seed and train.eval_seed must be >= 0"),
    ("--adam-beta1", "2", "adam_beta1 and train.adam_beta2 must be in [0, 1)"),
    ("--adam-eps", "-1", "train.adam_eps must be > 0"),
    ("--type-vocab-size", "0", "model.type_vocab_size must be >= 1"),
    ("--init-std", "-1", "model.init_std must be a positive number"),
    ("--qk-init-std", "0", "model.qk_init_std must be > 0"),
])
def test_out_of_range_settings_are_one_line_errors(capsys, tmp_path, flag, value, message):
    assert message in cli_error(capsys, "pretrain", flag, value, "--out", tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("damage, message", [
    ("empty latest", "latest is damaged"),
    ("binary latest", "latest is damaged"),
    ("truncated state", "state.json: sha256 does not match manifest.json"),
    ("deleted state", "state.json is missing; the checkpoint is incomplete"),
])
def test_a_damaged_checkpoint_is_named_not_a_traceback(capsys, tmp_path, run_dir, damage, message):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    latest, state = run / "checkpoints" / "latest", run / "checkpoints" / "step-00000006" / "state.json"
    before = (run / "checkpoints" / "step-00000003" / "model.safetensors").read_bytes()
    if damage == "empty latest":
        latest.write_text("")
    elif damage == "binary latest":
        latest.write_bytes(b"\xff\xfe\x00step")
    elif damage == "truncated state":
        state.write_text(state.read_text()[:100])
    else:
        state.unlink()
    assert message in cli_error(capsys, "pretrain", "--resume", run)
    assert (run / "checkpoints" / "step-00000003" / "model.safetensors").read_bytes() == before  # nothing damaged


def test_broken_json_line_message_reads_well(capsys, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "abc\n')
    err = cli_error(capsys, "prepare", "--train", tmp_path / "bad.jsonl", "--tokenizer", "char", "--cache-dir",
                    tmp_path / "cache")
    assert "bad.jsonl:2: not valid JSON (" in err and " at: column " in err and "at at" not in err


@pytest.mark.parametrize("weight_map, message", [
    (["model-1.safetensors"], "not a safetensors index"),
    ({"a": "../../etc/passwd"}, "is not a file in"),
    ({"a": 5}, "is not a file in"),
])
def test_a_hostile_transformers_index_is_refused(capsys, tmp_path, run_dir, weight_map, message):
    hf = tmp_path / "hf"
    shutil.copytree(run_dir / "hf", hf)
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert message in cli_error(capsys, "fill", hf, "a [MASK]")


def test_every_setting_declares_what_resume_does_with_it():
    import dataclasses

    from maskedlm.config import SECTIONS

    policies = {f.metadata["resume"] for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    assert policies == {"free", "fixed", "never", "ignore"}


@pytest.mark.parametrize("flags, allowed, message", [
    (["--lr", "0.01"], False, "would change the run: train.lr: 0.001 -> 0.01 (pass --allow-config-change"),
    (["--objective", "mlm+nsp", "--allow-config-change"], False, "ModernBERT has no pooler or next-sentence head"),
    (["--arch", "bert", "--allow-config-change"], False, "cannot change model.arch: 'modernbert' -> 'bert'"),
    (["--tokenizer", "elsewhere.json", "--allow-config-change"], False, "cannot change data.tokenizer"),
    (["--optimizer", "lamb", "--allow-config-change"], False, "cannot change train.optimizer"),
    (["--lr", "0.01", "--allow-config-change"], True, "changed: train.lr: 0.001 -> 0.01; train.max_steps: 6 -> 9"),
    (["--log-every", "2"], True, "changed: train.max_steps: 6 -> 9; train.log_every: 1 -> 2"),
])
def test_resume_refuses_or_applies_each_kind_of_change(capsys, tmp_path, run_dir, flags, allowed, message):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    args = ["pretrain", "--resume", run, "--max-steps", "9", *flags]
    if not allowed:
        assert message in cli_error(capsys, *args)
        return
    assert main([str(a) for a in args]) == 0
    assert message in capsys.readouterr().out
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    if "--lr" in flags:  # applied: the resumed steps run at the new peak's schedule
        from maskedlm.schedules import lr_factor

        assert lrs[7] == pytest.approx(0.01 * lr_factor(7 / 9, 0.06))


def test_resume_never_changes_the_objective_of_a_bert_run(capsys, tmp_path):
    """The run folder written before Step 10 is a BERT's (its config predates model.arch)."""
    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "data" / "run-before-step10", run)
    message = cli_error(capsys, "pretrain", "--resume", run, "--objective", "mlm+nsp", "--allow-config-change")
    assert "cannot change train.objective: 'mlm' -> 'mlm+nsp'" in message


def test_a_changed_weight_decay_reaches_the_optimizer(tmp_path, run_dir):
    from maskedlm.distributed import Dist
    from maskedlm.run import build_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = find_checkpoint(run)
    cfg = read_state(ckpt).config
    cfg.train.resume, cfg.train.allow_config_change = str(run), True
    cfg.train.weight_decay, cfg.train.adam_beta2 = 0.5, 0.95
    built = build_run(cfg.resolved(), torch.device("cpu"), Dist(), quiet)
    try:
        groups = built.step.optimizer.param_groups
        assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and all(g["betas"] == (0.9, 0.95) for g in groups)
    finally:
        built.feed.close()
        built.lock.release()


def test_a_resumed_run_records_every_step_once(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = find_checkpoint(run / "checkpoints" / "step-00000003")  # rewinds: steps 4-6 are trained again
    cfg = read_state(ckpt).config
    cfg.train.resume = str(ckpt.path)
    pretrain(cfg, log=quiet, progress_bar=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "split" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "split" in r] == [6]


def test_the_final_checkpoint_is_written_before_the_final_evaluation(tmp_path, corpus_dir, monkeypatch):
    from maskedlm.evaluate import Evaluator

    def dies(self, *a, **k):
        raise RuntimeError("killed during the final evaluation")

    monkeypatch.setattr(Evaluator, "__call__", dies)
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=5, checkpoint_every=0, eval_every=0)
    with pytest.raises(RuntimeError, match="final evaluation"):
        pretrain(cfg, log=quiet, progress_bar=False)
    assert find_checkpoint(tmp_path / "run").name == "step-00000005"


# -- the server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(run_dir):
    srv = make_server(run_dir, port=0, timeout=1.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def raw_request(port: int, data: bytes) -> tuple[int, dict]:
    """Send bytes as they are; return the status and JSON body (status 0 if the server closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        response = b""
        while chunk := s.recv(65536):
            response += chunk
    if not response:
        return 0, {}
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}")


def post(port: int, body: bytes, *, host: str = "127.0.0.1", length: str | None = None) -> tuple[int, dict]:
    length = str(len(body)) if length is None else length
    return raw_request(port, b"POST /api/fill HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json"
                       b"\r\nContent-Length: " + length.encode() + b"\r\nConnection: close\r\n\r\n" + body)


@pytest.mark.parametrize("host", ["evil.attacker.com", "evil.attacker.com:8000", "127.0.0.1.evil.com"])
def test_requests_for_another_host_are_refused(server, host):
    status, res = raw_request(server, f"GET /api/sample HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert status == 403 and "not served here" in res["error"]
    status, _ = raw_request(server, f"GET /api/info HTTP/1.1\r\nHost: localhost:{server}\r\nConnection: close\r\n\r\n".encode())
    assert status == 200


def test_allowed_hosts_can_be_named(run_dir):
    srv = make_server(run_dir, port=0, allowed_hosts=("mybox.lan",))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        req = f"GET /api/info HTTP/1.1\r\nHost: mybox.lan:{port}\r\nConnection: close\r\n\r\n".encode()
        assert raw_request(port, req)[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("body, length, message", [
    (b'{"text": "the [MASK]", "top_k": true}', None, "top_k must be an integer"),
    (b"[" * 5000 + b"]" * 5000, None, "not nested deeply"),
    (b'{"text": "the [MASK]"}', "abc", "Content-Length must be a non-negative integer"),
    (b'{"text": "the [MASK]"}', "-1", "Content-Length must be a non-negative integer"),
])
def test_malformed_requests_get_a_4xx(server, body, length, message):
    status, res = post(server, body, length=length)
    assert status == 400 and message in res["error"]


def test_idle_clients_are_disconnected(server):
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", server), timeout=30) as s:
        assert s.recv(100) == b""  # the server closed the idle connection
    assert time.time() - t0 < 10
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/api/info", timeout=30) as r:  # still serving
        assert r.status == 200


def test_export_of_a_transformers_folder_says_what_it_is(capsys, run_dir, tmp_path):
    assert "already a transformers folder" in cli_error(capsys, "export", run_dir / "hf", "--out", tmp_path / "x")
    assert "evaluate takes a maskedlm run folder" in cli_error(capsys, "evaluate", run_dir / "hf")


def test_user_errors_are_not_swallowed_by_the_library(run_dir):
    from maskedlm.loading import open_folder

    with pytest.raises(UserError, match="no such run folder"):
        open_folder(run_dir / "nope")


@pytest.mark.slow
def test_a_run_folder_has_one_writer_and_a_killed_one_does_not_block(capsys, tmp_path, corpus_dir):
    import os
    import signal
    import subprocess
    import sys

    run = tmp_path / "busy"
    args = ["pretrain", "--train", str(corpus_dir), "--out", str(run), "--model", "tiny", "--vocab-size", "300",
            "--seq-len", "32", "--batch-size", "8", "--max-steps", "100000", "--checkpoint-every", "5",
            "--eval-every", "0", "--log-every", "1", "--no-sample", "--precision", "fp32"]
    proc = subprocess.Popen([sys.executable, "-m", "maskedlm", *args], env={**os.environ},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoints" / "latest").exists():
            time.sleep(0.05)
        err = cli_error(capsys, "pretrain", "--resume", run, "--max-steps", "100001")
        assert f"is in use by another maskedlm run (PID {proc.pid} on " in err
        assert "already exists and is not empty" in cli_error(capsys, *args)  # a second fresh run on the folder
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    # The killed holder's lock is gone with it: the run resumes.
    assert main(["pretrain", "--resume", str(run), "--max-steps", "12"]) == 0


@pytest.mark.parametrize("case, message", [
    ("deep jsonl", "JSON nested too deeply to read"),
    ("bad dataset_dict", "not a datasets DatasetDict description"),
    ("datasets folder without data", "a datasets folder without its data"),
])
def test_hostile_corpora_are_one_line_errors(capsys, tmp_path, case, message):
    if case == "deep jsonl":
        path = tmp_path / "deep.jsonl"
        path.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    else:
        path = tmp_path / "ds"
        path.mkdir()
        if case == "bad dataset_dict":
            (path / "dataset_dict.json").write_text('{"splits": ')
        else:
            (path / "state.json").write_text("{}")
            (path / "dataset_info.json").write_text("{}")
    assert message in cli_error(capsys, "prepare", "--train", path, "--tokenizer", "char", "--cache-dir", tmp_path / "c")


def test_a_config_file_that_is_not_utf8(capsys, tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"train:\n  lr: \xff\xfe\n")
    assert "not UTF-8 text" in cli_error(capsys, "pretrain", "--config", tmp_path / "c.yaml")


def test_a_full_disk_at_the_final_save_is_one_error_naming_the_last_good_checkpoint(tmp_path, corpus_dir, monkeypatch):
    import maskedlm.checkpoint as ck
    from safetensors import SafetensorError

    real, calls = ck.save_file, {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (3 files) is written; the final one is not
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full_disk)
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=6, checkpoint_every=3, eval_every=0)
    with pytest.raises(UserError, match=r"could not write the final checkpoint .*StorageFull.*last good one is .*step-00000003"):
        pretrain(cfg, log=quiet, progress_bar=False)
    assert find_checkpoint(tmp_path / "run").name == "step-00000003"


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_one_line(capsys, tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("text\n")
    path.chmod(0)
    assert "Permission denied" in cli_error(capsys, "prepare", "--train", path, "--tokenizer", "char",
                                            "--cache-dir", tmp_path / "c")


def test_a_killed_writers_temporary_checkpoint_is_cleaned_up(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    stale = run / "checkpoints" / ".tmp-step-00000005-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    assert main(["pretrain", "--resume", str(run), "--max-steps", "8"]) == 0
    assert not stale.exists()
