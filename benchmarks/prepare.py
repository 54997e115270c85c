"""Data preparation throughput and peak memory: `maskedlm prepare` vs the peer's way.

A corpus of >= 1 GB is generated from the embedded Shakespeare scenes (shuffled, several files, documents
separated by blank lines). Both systems tokenise it with the same fast WordPiece tokenizer on the same
number of processes:

* maskedlm:  `maskedlm prepare --train DIR --tokenizer tokenizer.json --workers N`
* peer:      `datasets.load_dataset("text", sample_by="paragraph")` then `.map(tokenizer, batched=True,
             num_proc=N)` with `transformers.PreTrainedTokenizerFast` on the same tokenizer.json, the way
             transformers' run_mlm.py prepares data.

Each runs in its own process tree; wall time and the peak of the summed resident memory of the tree
(sampled every 50 ms with psutil) are recorded. MB/s counts input bytes.

    python benchmarks/prepare.py --gb 1.0 --workers 2 --out benchmarks/results/prepare
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


PEER = r"""
import sys, datasets
from transformers import PreTrainedTokenizerFast
files, tok_file, workers, cache = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]), sys.argv[4]
tok = PreTrainedTokenizerFast(tokenizer_file=tok_file)
ds = datasets.load_dataset("text", data_files=files, sample_by="paragraph", split="train", cache_dir=cache)
out = ds.map(lambda b: tok(b["text"], add_special_tokens=False, return_attention_mask=False), batched=True,
             num_proc=workers, remove_columns=["text"])
print(sum(len(x) for x in out.select_columns(["input_ids"]).to_dict()["input_ids"][:1]), len(out))
"""


def generate(folder: Path, gb: float, files: int) -> list[Path]:
    """Shuffled Shakespeare scenes, blank-line separated, until `gb` gigabytes over `files` files."""
    from maskedlm.corpus import clean_play, play_scenes, shakespeare_plays

    scenes = [" ".join(clean_play(s).split()) for _, md in shakespeare_plays() for s in play_scenes(md)]
    rng = random.Random(0)
    per_file = int(gb * 1e9 / files)
    paths = []
    for i in range(files):
        p = folder / f"corpus-{i:02d}.txt"
        written = 0
        with open(p, "w", encoding="utf-8") as f:
            while written < per_file:
                chunk = "\n\n".join(rng.sample(scenes, 50)) + "\n\n"
                f.write(chunk)
                written += len(chunk.encode())
        paths.append(p)
    return paths


def measure(cmd: list[str], env: dict) -> dict:
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [p, *p.children(recursive=True)]
                peak = max(peak, sum(q.memory_info().rss for q in procs if q.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{err[-3000:]}")
    return {"seconds": time.time() - t0, "peak_rss_mb": peak / 2**20, "stdout": out[-2000:]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prepare"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="maskedlm-prepare-"))
    from maskedlm.config import DataConfig
    from maskedlm.data import build_tokenizer

    tok = build_tokenizer(DataConfig(vocab_size=30522), log=lambda *a: None)
    tok_file = work / "tokenizer.json"
    tok_file.write_text(tok.hf.to_str())
    print(f"generating {args.gb:g} GB in {args.files} files ...", flush=True)
    (work / "corpus").mkdir()
    files = generate(work / "corpus", args.gb, args.files)
    size = sum(f.stat().st_size for f in files)
    env = dict(os.environ)
    ours = measure([sys.executable, "-m", "maskedlm", "prepare", "--train", str(work / "corpus"), "--tokenizer",
                    str(tok_file), "--workers", str(args.workers), "--cache-dir", str(work / "ours")], env)
    meta = json.loads(ours["stdout"][ours["stdout"].index("{"):])
    tokens = meta["train"]["tokens"] + meta["valid"]["tokens"]
    print(f"maskedlm: {ours['seconds']:.0f}s, {size / ours['seconds'] / 1e6:.1f} MB/s, peak {ours['peak_rss_mb']:.0f} MB",
          flush=True)
    peer = measure([sys.executable, "-c", PEER, ",".join(map(str, files)), str(tok_file), str(args.workers),
                    str(work / "peer")], env)
    print(f"datasets.map: {peer['seconds']:.0f}s, {size / peer['seconds'] / 1e6:.1f} MB/s, peak {peer['peak_rss_mb']:.0f} MB",
          flush=True)
    summary = {"date": datetime.date.today().isoformat(), "machine": platform.node(), "cpus": os.cpu_count(),
               "workers": args.workers, "corpus_bytes": size, "files": args.files, "tokens": tokens,
               "maskedlm": {"seconds": ours["seconds"], "mb_per_s": size / ours["seconds"] / 1e6,
                            "tokens_per_s": tokens / ours["seconds"], "peak_rss_mb": ours["peak_rss_mb"]},
               "datasets_map": {"seconds": peer["seconds"], "mb_per_s": size / peer["seconds"] / 1e6,
                                "peak_rss_mb": peer["peak_rss_mb"]}}
    summary["speed_ratio"] = summary["maskedlm"]["mb_per_s"] / summary["datasets_map"]["mb_per_s"]
    summary["memory_ratio"] = summary["maskedlm"]["peak_rss_mb"] / summary["datasets_map"]["peak_rss_mb"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prepare.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{size / 1e9:.2f} GB, {args.workers} workers: maskedlm {summary['maskedlm']['mb_per_s']:.1f} MB/s "
          f"(peak {ours['peak_rss_mb']:.0f} MB) vs datasets.map {summary['datasets_map']['mb_per_s']:.1f} MB/s "
          f"(peak {peer['peak_rss_mb']:.0f} MB): {summary['speed_ratio']:.2f}x the speed, "
          f"{summary['memory_ratio']:.2f}x the memory")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
