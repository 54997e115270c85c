"""Judge a run's held-out accuracy outside maskedlm: `transformers` loads RUN/hf, masks the held-out text with
its own `DataCollatorForLanguageModeling` (15%, 80/10/10) and counts correct predictions; the result should be
within a point of maskedlm's evaluator (RUN/eval.json), which uses its own fixed masks.

The held-out sequences are the ones maskedlm evaluates: the run's held-out split packed into sequences of
its length (the last one padded), the first `eval_sequences` of them. The collator draws its masks from
torch's global generator; several draws are averaged.

    python benchmarks/hf_check.py RUN [--draws 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from maskedlm.batches import PackedSequences
from maskedlm.checkpoint import read_config
from maskedlm.data import prepare
from maskedlm.tokenizer import Tokenizer


def hf_accuracy(run: Path, draws: int, batch: int = 64) -> tuple[list[float], int]:
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    cfg = read_config(run)
    tok = Tokenizer.from_file(run / "tokenizer.json")
    split = prepare(cfg.data, tokenizer=tok, log=lambda *a: None).valid
    seqs = PackedSequences(split, cfg.data.seq_len, tok.special, pad_last=True, what="held-out")
    ids, attn = seqs.get(np.arange(min(len(seqs), cfg.train.eval_sequences)))
    attn = np.ones_like(ids) if attn is None else attn
    model = AutoModelForMaskedLM.from_pretrained(run / "hf").eval()
    collator = DataCollatorForLanguageModeling(AutoTokenizer.from_pretrained(run / "hf"), mlm_probability=0.15)
    accuracies = []
    for draw in range(draws):
        torch.manual_seed(draw)
        correct = total = 0
        for start in range(0, len(ids), batch):
            rows = [{"input_ids": torch.from_numpy(ids[i]), "attention_mask": torch.from_numpy(attn[i])}
                    for i in range(start, min(len(ids), start + batch))]
            b = collator(rows)
            with torch.no_grad():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            keep = b["labels"] != -100
            correct += int((logits.argmax(-1)[keep] == b["labels"][keep]).sum())
            total += int(keep.sum())
        accuracies.append(correct / total)
    return accuracies, len(ids)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--draws", type=int, default=5, help="independent collator masks to average")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    ours = json.loads((args.run / "eval.json").read_text())["accuracy"]
    theirs, n = hf_accuracy(args.run, args.draws)
    out = {"run": str(args.run), "sequences": n, "maskedlm_accuracy": ours, "transformers_accuracy_draws": theirs,
           "transformers_accuracy": statistics.mean(theirs), "difference_points": 100 * (statistics.mean(theirs) - ours)}
    print(f"maskedlm evaluator {ours:.2%}; transformers + DataCollatorForLanguageModeling {out['transformers_accuracy']:.2%} "
          f"(mean of {args.draws} draws, {min(theirs):.2%}-{max(theirs):.2%}); difference {out['difference_points']:+.2f} points")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
