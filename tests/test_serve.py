"""Step 8: the local web page and its JSON endpoints, curves, TensorBoard, progress — and a real browser."""

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from maskedlm import fill_mask, load, pretrain
from maskedlm.serve import make_server

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tiny_config(tmp, [str(corpus_dir)], max_steps=12, log_every=2, eval_every=4, checkpoint_every=6)
    cfg.train.tensorboard = True
    return pretrain(cfg, log=lambda *a: None, progress_bar=False).run_dir


@pytest.fixture(scope="module")
def server(run_dir):
    srv = make_server(run_dir, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def call(url, body=None, method=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_binds_loopback_by_default(run_dir):
    srv = make_server(run_dir, port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()


def test_fill_endpoint_equals_the_library(server, run_dir):
    status, res = call(f"{server}/api/fill", {"text": "the [MASK] is dead , long live the [MASK] .", "top_k": 4})
    assert status == 200 and len(res["masks"]) == 2 and all(len(m) == 4 for m in res["masks"])
    model, tok = load(run_dir)
    ref = fill_mask(model, tok, "the [MASK] is dead , long live the [MASK] .", top_k=4)
    assert [[p["id"] for p in m] for m in res["masks"]] == [[p.token_id for p in m] for m in ref]
    assert abs(res["masks"][0][0]["prob"] - ref[0][0].prob) < 1e-6


@pytest.mark.parametrize("body, raw, status, message", [
    ({"text": "no blanks here"}, None, 400, "no [MASK] token"),
    ({"text": "[MASK] " * 1000}, None, 413, "text over 2000 characters"),
    ({"text": "a [MASK]", "top_k": 0}, None, 400, "top_k must be an integer from 1 to 50"),
    ({"txt": "a [MASK]"}, None, 400, "expected"),
    (None, b"{not json", 400, "the body must be JSON"),
    (None, b"x" * 20000, 413, "request body over"),
])
def test_bad_requests_get_4xx_with_a_message(server, body, raw, status, message):
    code, res = call(f"{server}/api/fill", body, raw=raw)
    assert code == status and message in res["error"]


def test_other_paths_and_methods(server):
    assert call(f"{server}/api/nope")[0] == 404
    assert call(f"{server}/api/metrics?since=x")[0] == 400
    assert call(f"{server}/api/fill", {"text": "[MASK]"}, method="PUT")[0] == 405


def test_metrics_endpoint_serves_new_records_as_the_run_writes_them(server, run_dir):
    status, res = call(f"{server}/api/metrics?since=0")
    assert status == 200 and res["records"] and res["next"] == len(res["records"])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 999, "loss": 1.0, "accuracy": 0.5, "lr": 0.0, "tokens_per_s": 1.0}) + "\n")
        f.write('{"step": 1000, "lo')  # a line still being written is not served yet
    _, more = call(f"{server}/api/metrics?since={res['next']}")
    assert [r["step"] for r in more["records"]] == [999] and more["next"] == res["next"] + 1


def test_sample_and_info(server):
    status, res = call(f"{server}/api/sample?lines=2")
    assert status == 200 and len(res["lines"]) == 2 and res["total"] > 0
    assert all(("guess" in t) == t.get("masked", False) for line in res["lines"] for t in line)
    status, info = call(f"{server}/api/info")
    assert info["weights"] == "model.safetensors" and info["model"]["hidden_size"] == 32


def test_a_run_still_training_serves_its_newest_checkpoint(tmp_path, run_dir):
    live = tmp_path / "live"
    shutil.copytree(run_dir, live)
    (live / "model.safetensors").unlink()
    (live / "checkpoints" / "latest").write_text("step-00000006\n")
    srv = make_server(live, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert call(f"{url}/api/info")[1]["weights"] == "checkpoint step-00000006"
        (live / "checkpoints" / "latest").write_text("step-00000012\n")  # a newer checkpoint appears
        assert call(f"{url}/api/fill", {"text": "a [MASK]"})[0] == 200
        assert call(f"{url}/api/info")[1]["weights"] == "checkpoint step-00000012"
    finally:
        srv.shutdown()
        srv.server_close()


def test_end_of_run_plot_and_tensorboard(run_dir):
    assert (run_dir / "metrics.png").stat().st_size > 10_000
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 500


def test_plot_without_matplotlib_is_a_clear_error(run_dir, monkeypatch):
    from maskedlm import UserError
    from maskedlm.plots import plot_metrics

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"plots need matplotlib \(pip install 'maskedlm\[plot\]'\)"):
        plot_metrics(run_dir)


def test_progress_prints_plain_lines_when_not_a_terminal(capsys):
    from maskedlm.progress import Progress

    bar = Progress(10, "tokenising", enabled=None, every=0.0)  # pytest's stderr is not a terminal
    bar.update(5, "5 MB/s")
    bar.close()
    assert "tokenising: [ 50%] 5 MB/s" in capsys.readouterr().err


def chrome():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(browser).exists() and Path(driver).exists()):
        if os.environ.get("MASKEDLM_REQUIRE_BROWSER"):
            pytest.fail("Chromium / ChromeDriver missing, and MASKEDLM_REQUIRE_BROWSER is set")
        pytest.skip("Chromium and ChromeDriver are not installed (CI installs them: .ci/run)")
    opts = Options()
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1100,900"]:
        opts.add_argument(a)
    opts.binary_location = browser
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.slow
def test_the_page_in_a_real_browser(server, run_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(exist_ok=True)
    d = chrome()
    try:
        d.get(server + "/")
        text = "to be or not to [MASK] , that is the [MASK] ."
        box = d.find_element(By.ID, "text")
        box.clear()
        box.send_keys(text)
        d.find_element(By.ID, "fill-button").click()
        WebDriverWait(d, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#predictions .pred")) == 10)
        shown = [e.get_attribute("data-token") for e in d.find_elements(By.CSS_SELECTOR, "#predictions .pred")]
        d.save_screenshot(str(ARTIFACTS / "serve-fill.png"))
        cli = subprocess.run([sys.executable, "-m", "maskedlm", "fill", str(run_dir), text, "--top-k", "5", "--json"],
                             capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
        expected = [p["token"] for mask in json.loads(cli.stdout) for p in mask]
        assert shown == expected
        # clicking a word masks it and predicts again
        d.find_elements(By.CSS_SELECTOR, "#words .chip")[0].click()
        WebDriverWait(d, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#predictions .mask-block")) == 3)
        # the curves draw
        d.find_element(By.CSS_SELECTOR, 'nav button[data-tab="curves"]').click()
        WebDriverWait(d, 30).until(lambda d: int(d.find_element(By.ID, "chart-loss").get_attribute("data-points") or 0) > 0)
        painted = d.execute_script("""
            const c = document.getElementById('chart-loss'), px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < px.length; i += 4) if (px[i] < 200 || px[i + 1] < 200 || px[i + 2] < 200) n++;
            return n;""")
        assert painted > 500
        d.save_screenshot(str(ARTIFACTS / "serve-curves.png"))
        d.find_element(By.CSS_SELECTOR, 'nav button[data-tab="sample"]').click()
        WebDriverWait(d, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sample-lines .sample-line"))
        assert d.find_elements(By.CSS_SELECTOR, "#sample-lines .right, #sample-lines .wrong")
        d.save_screenshot(str(ARTIFACTS / "serve-sample.png"))
    finally:
        d.quit()
