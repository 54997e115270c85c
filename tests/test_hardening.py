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
    ("binary manifest", "unreadable manifest.json"),
    ("manifest not a mapping", "manifest.json is damaged"),
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
    elif damage == "binary manifest":
        (state.parent / "manifest.json").write_bytes(b"\xff\xfe{")
    elif damage == "manifest not a mapping":
        (state.parent / "manifest.json").write_text("5")
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


def test_a_run_resumed_at_its_end_evaluates_once_and_keeps_its_checkpoint(tmp_path, run_dir):
    """A run killed after its final checkpoint (during the final evaluation or the probe) is resumed to finish:
    it evaluates step 6 again, and neither duplicates that record nor rewrites the checkpoint it resumed from."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = run / "checkpoints" / "step-00000006"
    inode = ckpt.stat().st_ino
    cfg = read_state(find_checkpoint(run)).config
    cfg.train.resume = str(run)
    assert pretrain(cfg, log=quiet, progress_bar=False).steps == 6
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "split" in r] == [6]
    assert ckpt.stat().st_ino == inode


def test_the_final_checkpoint_is_written_before_the_final_evaluation(tmp_path, corpus_dir, monkeypatch):
    from maskedlm.evaluate import Evaluator

    def dies(self, *a, **k):
        raise RuntimeError("killed during the final evaluation")

    monkeypatch.setattr(Evaluator, "__call__", dies)
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=5, checkpoint_every=0, eval_every=0)
    with pytest.raises(RuntimeError, match="final evaluation"):
        pretrain(cfg, log=quiet, progress_bar=False)
    assert find_checkpoint(tmp_path / "run").name == "step-00000005"


@pytest.mark.parametrize("eval_every, stops_at", [(3, 3), (0, 5)])  # an evaluation mid-run; the final one
def test_sigterm_during_an_evaluation_stops_it(tmp_path, corpus_dir, monkeypatch, eval_every, stops_at):
    import os
    import signal

    import maskedlm.evaluate as ev

    batches, plain = [], ev.autocast

    def first_batch_gets_a_signal(*a):
        batches.append(1)
        if len(batches) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return plain(*a)

    monkeypatch.setattr(ev, "autocast", first_batch_gets_a_signal)
    sizes, call = [], ev.Evaluator.__call__
    monkeypatch.setattr(ev.Evaluator, "__call__", lambda self, *a, **k: sizes.append(len(self.batches)) or call(self, *a, **k))
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=5, checkpoint_every=0, eval_every=eval_every,
                      eval_sequences=512, log_every=1)
    res = pretrain(cfg, log=quiet, progress_bar=False)
    assert (res.stopped_by, res.eval, res.steps) == ("SIGTERM", None, stops_at)
    assert len(batches) == 1 and sizes[0] >= 3  # the evaluation gave up at its next batch, not after all of them
    assert sorted(p.name for p in (res.run_dir / "checkpoints").iterdir() if p.is_dir()) == [f"step-{stops_at:08d}"]
    records = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r.get("split") == "valid"] and not (res.run_dir / "eval.json").exists()
    monkeypatch.setattr(ev, "autocast", plain)  # the resumed run finishes, with its final evaluation
    cfg.train.resume, cfg.train.out = str(res.run_dir), None
    done = pretrain(cfg, log=quiet, progress_bar=False)
    assert done.stopped_by is None and done.steps == 5 and (res.run_dir / "eval.json").is_file()
    records = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "valid"] == [5]


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
                       b"\r\nContent-Length: " + length.encode("latin-1") + b"\r\nConnection: close\r\n\r\n" + body)


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
    (b'{"text": "the [MASK]"}', "\u00b2", "Content-Length must be a non-negative integer"),  # str.isdigit() says yes
    (b'{"text": "the [MASK]"}', "9" * 5000, "Content-Length must be a non-negative integer"),
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


@pytest.mark.parametrize("head", [b"GET /api/info HTTP/1.1\r\nHost: localhost\r\n",  # headers never end
                                  b"POST /api/fill HTTP/1.1\r\nHost: localhost\r\nContent-Length: 50\r\n\r\n{"])
def test_a_client_trickling_its_request_is_cut_off(server, head, capfd):
    """Slowloris: a byte every 0.3 s resets a per-read timeout for ever; the request has a deadline (1 s here)."""
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", server), timeout=30) as s:
        s.sendall(head)
        with pytest.raises(OSError):
            while time.time() - t0 < 10:
                s.sendall(b"X")
                time.sleep(0.3)
                s.setblocking(False)
                try:
                    if s.recv(4096) == b"":
                        raise ConnectionResetError("closed by the server")
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
    assert time.time() - t0 < 5
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/api/info", timeout=30) as r:  # still serving
        assert r.status == 200
    assert "Traceback" not in capfd.readouterr().err


def test_a_serve_timeout_must_be_positive(capsys, run_dir):
    assert "--timeout must be > 0" in cli_error(capsys, "serve", run_dir, "--timeout", "0", "--port", "0")


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


@pytest.mark.parametrize("what", ["file", "folder"])
def test_an_unreadable_file_or_folder_is_one_line(capsys, what):
    """Mode 000, read by a user who is not root. Root reads anything, so as root the read runs with the
    effective user `nobody` (every module it needs imported first, by the same command on a readable file)."""
    import contextlib
    import os
    import pwd
    import tempfile

    @contextlib.contextmanager
    def as_nobody():
        if os.geteuid() != 0:
            yield
            return
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root without a 'nobody' user to read as")
        os.setegid(nobody.pw_gid)
        os.seteuid(nobody.pw_uid)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        work = Path(tmp)
        work.chmod(0o777)
        readable = work / "open.txt"
        readable.write_text("text\n")
        assert main(["prepare", "--train", str(readable), "--tokenizer", "char", "--cache-dir", str(work / "c")]) == 0
        capsys.readouterr()
        target = work / ("secret.txt" if what == "file" else "closed")
        if what == "file":
            target.write_text("text\n")
        else:
            target.mkdir()
            (target / "a.txt").write_text("text\n")
        target.chmod(0)
        try:
            with as_nobody():
                err = cli_error(capsys, "prepare", "--train", target, "--tokenizer", "char", "--cache-dir", work / "c")
        finally:
            target.chmod(0o700)
    assert "Permission denied" in err


def test_a_killed_writers_temporary_checkpoint_is_cleaned_up(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    stale = run / "checkpoints" / ".tmp-step-00000005-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    assert main(["pretrain", "--resume", str(run), "--max-steps", "8"]) == 0
    assert not stale.exists()


# -- readers of a run folder while its writer works -------------------------------------------------------


def training_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of a finished run as it looks mid-training: checkpoints, no final weights."""
    run = tmp_path / "live"
    shutil.copytree(run_dir, run)
    (run / "model.safetensors").unlink()
    return run


def test_readers_of_a_run_still_training_are_told_who_writes_it(capsys, tmp_path, run_dir):
    from maskedlm import load
    from maskedlm.paths import RunDir, RunLock

    run = training_copy(run_dir, tmp_path)
    lock = RunLock(RunDir(run)).acquire()
    try:
        err = cli_error(capsys, "export", run, "--out", tmp_path / "x")
        assert "is still training (PID" in err and "step-00000006" in err
        with pytest.raises(UserError, match="still training"):
            load(run)
    finally:
        lock.release()
    assert "did the run finish?" in cli_error(capsys, "export", run, "--out", tmp_path / "x")  # no writer now


def test_a_finished_run_training_again_is_not_read_from_its_old_weights(capsys, tmp_path, run_dir):
    from maskedlm.loading import open_folder
    from maskedlm.paths import RunDir, RunLock

    run = tmp_path / "again"
    shutil.copytree(run_dir, run)  # finished: model.safetensors from step 6; now resumed (lock held)
    lock = RunLock(RunDir(run)).acquire()
    try:
        assert "from an earlier end" in cli_error(capsys, "export", run, "--out", tmp_path / "x")
        assert open_folder(run, live=True).source == "checkpoint step-00000006"  # serve: the newest checkpoint
    finally:
        lock.release()
    assert open_folder(run, live=True).source == "model.safetensors"


def test_serve_keeps_its_weights_when_newer_ones_cannot_be_read(tmp_path, run_dir, monkeypatch):
    import maskedlm.serve as serve

    run = training_copy(run_dir, tmp_path)
    state = serve.RunModel(run)
    model = state.model
    (run / "checkpoints" / "latest").write_text("step-00000003\n")  # "newer" weights appear ...
    monkeypatch.setattr(serve, "open_folder", lambda *a, **k: (_ for _ in ()).throw(UserError("half-written")))
    state.refresh()  # ... and cannot be read (yet): the page keeps answering with what it has
    assert state.model is model and state.source == "checkpoint step-00000006"
    monkeypatch.undo()
    state.refresh()
    assert state.source == "checkpoint step-00000003"


def test_a_live_reader_follows_a_checkpoint_rotated_away_under_it(tmp_path, run_dir, monkeypatch):
    import maskedlm.loading as loading

    run = training_copy(run_dir, tmp_path)
    (run / "checkpoints" / "latest").write_text("step-00000003\n")
    verify = loading.verify_checkpoint

    def writer_moves_on(ckpt, **kw):  # between reading `latest` and reading the files, the writer rotates
        if ckpt.name == "step-00000003":
            (run / "checkpoints" / "latest").write_text("step-00000006\n")
            shutil.rmtree(ckpt.path)
        return verify(ckpt, **kw)

    monkeypatch.setattr(loading, "verify_checkpoint", writer_moves_on)
    assert loading.open_folder(run, live=True).source == "checkpoint step-00000006"


def test_the_transformers_folder_appears_whole(tmp_path, corpus_dir, monkeypatch):
    import maskedlm.artifacts as artifacts

    written = []

    def export(model, tok, cfg, out):
        written.append((Path(out).name, (Path(out).parent / "hf").exists()))
        return export_trained(model, tok, cfg, out)

    export_trained = artifacts.export_trained
    monkeypatch.setattr(artifacts, "export_trained", export)
    res = pretrain(tiny_config(tmp_path, [str(corpus_dir)], max_steps=2, eval_every=0), log=quiet, progress_bar=False)
    assert written == [(".hf.tmp", False)]  # written aside; RUN/hf did not exist half-written meanwhile
    assert (res.run_dir / "hf" / "config.json").is_file() and not (res.run_dir / ".hf.tmp").exists()


def test_resume_refuses_training_data_edited_in_place(capsys, tmp_path, corpus_dir):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    cfg = tiny_config(tmp_path, [str(corpus)], max_steps=3, checkpoint_every=3, eval_every=0)
    run = pretrain(cfg, log=quiet, progress_bar=False).run_dir
    assert read_state(find_checkpoint(run)).train_state.data  # the content key is recorded
    text = sorted(corpus.rglob("*.txt"))[0]
    text.write_text(text.read_text() + "\nA line added after the checkpoint, at the same path.\n")
    err = cli_error(capsys, "pretrain", "--resume", run, "--max-steps", "5")
    assert "the training data changed since step-00000003" in err
    assert main(["pretrain", "--resume", str(run), "--max-steps", "5", "--allow-config-change"]) == 0
    assert "training data's content" in capsys.readouterr().out


def test_a_run_whose_tokenizer_was_swapped_is_refused(capsys, tmp_path, run_dir):
    """tokenizer.json replaced after training: resume and loading a checkpoint name both hashes."""
    from maskedlm import load
    from maskedlm.tokenizer import Tokenizer

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    other = Tokenizer.train_char(["a different alphabet: 0123456789 xyz"])
    other.save(run)
    assert "the checkpoint was trained with" in cli_error(capsys, "pretrain", "--resume", run, "--max-steps", "8")
    with pytest.raises(UserError, match="not the tokenizer"):
        load(run / "checkpoints" / "step-00000006")


def test_checkpoints_every_few_minutes(tmp_path, corpus_dir):
    """--checkpoint-minutes alone (no step cadence): a checkpoint once that much time has passed."""
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=12, checkpoint_every=0, checkpoint_minutes=1e-9,
                      keep_checkpoints=100, eval_every=0)
    run = pretrain(cfg, log=quiet, progress_bar=False).run_dir
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps == list(range(1, 13))  # every step, as each took longer than the interval
