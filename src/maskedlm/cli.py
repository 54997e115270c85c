"""The `maskedlm` command: thin subcommands over the library.

Every config field is one flag of `pretrain` (generated from the dataclasses, so the two cannot drift);
`--config FILE` is read first and flags override it. A `UserError` anywhere becomes one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any, Literal

from . import __version__
from .config import Config, FinetuneConfig, cli_fields, flag_name, load_config_file
from .errors import UserError


def _add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...], section_types: dict | None = None) -> None:
    groups: dict[str, Any] = {}
    for section, f, tp in cli_fields(section_types):
        if section not in sections:
            continue
        group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS}
        default = None if f.default is dataclasses.MISSING else f.default
        help_ = f.metadata["help"] + (f" (default: {default})" if default not in (None, "") else "")
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            tp = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kwargs.update(nargs="+", metavar="PATH")
        elif origin is Literal:
            kwargs["choices"] = list(args)
        elif hasattr(tp, "parse"):  # a value with its own grammar (e.g. a schedule): parsed by the config
            kwargs.update(type=str, metavar="SPEC")
        else:
            kwargs.update(type=tp, metavar={int: "N", float: "X"}.get(tp, f.name.upper()))
        group.add_argument(flag_name(f), help=help_, **kwargs)


def _config_from_args(ns: argparse.Namespace) -> Config:
    cfg = Config()
    resume = vars(ns).get("train.resume")
    if resume:  # a resumed run starts from its own config; flags then say what changes
        from .checkpoint import find_checkpoint, read_state, verify_checkpoint

        ckpt = find_checkpoint(resume)
        verify_checkpoint(ckpt, files=(ckpt.STATE,))  # a damaged state.json is named by its checksum
        cfg = read_state(ckpt).config
    if getattr(ns, "config", None):
        cfg.update(load_config_file(ns.config), source=ns.config)
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    cfg.update(overrides, source="command line")
    cfg.validate()
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskedlm", description="Pre-train BERT-style masked language models.")
    parser.add_argument("--version", action="version", version=f"maskedlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pre-train a model (default: mini on the embedded Shakespeare corpus)")
    p.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON config; flags override it")
    _add_config_flags(p, ("model", "data", "mask", "train"))

    p = sub.add_parser("prepare", help="tokenise a corpus into the cache (pretrain does this too)")
    p.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON config; flags override it")
    _add_config_flags(p, ("data",))

    p = sub.add_parser("evaluate", help="held-out masked-token loss, accuracy and perplexity of a run")
    p.add_argument("run", help="run folder or checkpoint; or a transformers folder with --valid")
    p.add_argument("--valid", nargs="+", metavar="PATH", help="evaluate on these files instead of the run's held-out split")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--probe", action="store_true", help="also run the genre probe (embedded corpus; trained vs random init)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("finetune", help="fine-tune a run's encoder for sequence classification (CSV or JSONL)")
    p.add_argument("run", help="run folder, or a Hugging Face BERT or ModernBERT folder")
    _add_config_flags(p, ("finetune",), {"finetune": FinetuneConfig})

    p = sub.add_parser("serve", help="a local web page: fill-mask, live training curves, masked predictions")
    p.add_argument("run", help="run folder (it may still be training), or a Hugging Face BERT or ModernBERT folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed to this host name (e.g. the machine's name when binding "
                        "0.0.0.0); by default only localhost and the bound address")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request must arrive whole within this time; idle and trickling clients are cut off")

    p = sub.add_parser("plot", help="draw a run's curves as a PNG (needs matplotlib)")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", help="PNG path (default: RUN/metrics.png)")

    p = sub.add_parser("export", help="write a run as a Hugging Face transformers folder")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer files)")

    p = sub.add_parser("fill", help="top-k predictions for each [MASK] in a text")
    p.add_argument("run", help="run folder, or a Hugging Face BERT or ModernBERT folder")
    p.add_argument("text", help='text with one or more [MASK], e.g. "to be or not to [MASK]"')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _pretrain(ns: argparse.Namespace) -> int:
    from .train import pretrain

    return 130 if pretrain(_config_from_args(ns)).stopped_by == "SIGINT" else 0


def _prepare(ns: argparse.Namespace) -> int:
    from .data import prepare

    prep = prepare(_config_from_args(ns).data)
    print(json.dumps({"folder": str(prep.folder), **prep.meta}, indent=2))
    return 0


def _evaluate(ns: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    res = evaluate_run(ns.run, ns.valid, device=ns.device, precision=ns.precision, log=lambda *a: print(*a, file=sys.stderr))
    out = res.as_dict()
    if ns.probe:
        from .loading import load
        from .probe import genre_probe
        from .runtime import resolve_device

        dev = resolve_device(ns.device)
        model, tok = load(ns.run, dev)
        out["probe"] = genre_probe(model, tok, dev, log=lambda *a: None if ns.json else print(*a))
    if ns.json:
        print(json.dumps(out))
    else:
        print(f"loss {res.loss:.4f}  accuracy {res.accuracy:.2%}  perplexity {res.perplexity:.2f}  "
              f"({res.predicted:,} predictions in {res.sequences} sequences)")
    return 0


def _finetune(ns: argparse.Namespace) -> int:
    from .finetune import finetune

    cfg = FinetuneConfig.from_dict({k.split(".", 1)[1]: v for k, v in vars(ns).items() if k.startswith("finetune.")},
                                   source="command line")
    res = finetune(ns.run, cfg)
    print(json.dumps({"accuracy": res.accuracy, "macro_f1": res.macro_f1, "epochs": res.epochs, "out": str(res.out_dir)}))
    return 0


def _export(ns: argparse.Namespace) -> int:
    from .loading import export_folder

    print(f"wrote {export_folder(ns.run, ns.out)}")
    return 0


def _serve(ns: argparse.Namespace) -> int:
    from .serve import serve

    serve(ns.run, ns.host, ns.port, ns.device, tuple(ns.allow_host), timeout=ns.timeout)
    return 0


def _plot(ns: argparse.Namespace) -> int:
    from .plots import plot_metrics

    print(f"wrote {plot_metrics(ns.run, ns.out)}")
    return 0


def _fill(ns: argparse.Namespace) -> int:
    from .fill import fill_mask
    from .loading import load
    from .runtime import resolve_device

    model, tok = load(ns.run, resolve_device(ns.device))
    preds = fill_mask(model, tok, ns.text, top_k=ns.top_k)
    if ns.json:
        print(json.dumps([[{"token": p.token, "id": p.token_id, "prob": p.prob} for p in mask] for mask in preds]))
        return 0
    for i, mask in enumerate(preds, 1):
        print(f"[MASK] #{i}:")
        for p in mask:
            print(f"  {p.prob:7.4f}  {p.token}")
    return 0


COMMANDS = {"pretrain": _pretrain, "prepare": _prepare, "evaluate": _evaluate, "finetune": _finetune,
            "export": _export, "serve": _serve, "plot": _plot, "fill": _fill}


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return COMMANDS[ns.command](ns)
    except UserError as e:
        print(f"maskedlm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user named that cannot be read or written (permissions, a full disk)
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"maskedlm: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maskedlm: interrupted", file=sys.stderr)
        return 130
