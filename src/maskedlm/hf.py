"""Hugging Face BERT interop: export a run to a `transformers` folder, and import BERT folders.

The key map below is the whole conversion: every one of our parameters corresponds to exactly one of
`BertForPreTraining`'s. Theirs additionally has `cls.predictions.decoder.weight` / `.bias`, tied to the
word embeddings and to `cls.predictions.bias`; like `save_pretrained`, we do not store them twice.

Exported folders load with `AutoModelForMaskedLM`, `AutoModelForPreTraining` (when the NSP head was
trained), `AutoModel`, `AutoTokenizer` and `pipeline("fill-mask")`, with no custom code. Imported folders may
hold `BertModel`, `BertForMaskedLM` or `BertForPreTraining` weights (safetensors, or a legacy
`pytorch_model.bin` read with `weights_only=True`) and a `tokenizer.json` or `vocab.txt`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import Config, ModelConfig
from .errors import UserError
from .model import BertForPreTraining
from .modernbert import ModernBertForPreTraining
from .paths import CONFIG, WEIGHTS, atomic_path, atomic_write
from .tokenizer import CLS, MASK, PAD, SEP, UNK, Tokenizer

_EMBEDDINGS = {
    "bert.embeddings.word.weight": "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position.weight": "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type.weight": "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.norm.weight": "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.norm.bias": "bert.embeddings.LayerNorm.bias",
}
_LAYER = {  # ours (under bert.layers.{i}.) -> theirs (under bert.encoder.layer.{i}.)
    "attn.query": "attention.self.query",
    "attn.key": "attention.self.key",
    "attn.value": "attention.self.value",
    "attn.out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
_POOLER = {
    "bert.pooler.weight": "bert.pooler.dense.weight",
    "bert.pooler.bias": "bert.pooler.dense.bias",
}
_MLM_HEAD = {
    "mlm.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm.bias": "cls.predictions.bias",
}
_NSP_HEAD = {
    "nsp.weight": "cls.seq_relationship.weight",
    "nsp.bias": "cls.seq_relationship.bias",
}
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def key_map(num_layers: int) -> dict[str, str]:
    """Our state-dict key -> Hugging Face `BertForPreTraining` state-dict key."""
    out = dict(_EMBEDDINGS)
    for i in range(num_layers):
        for ours, theirs in _LAYER.items():
            for kind in ("weight", "bias"):
                out[f"bert.layers.{i}.{ours}.{kind}"] = f"bert.encoder.layer.{i}.{theirs}.{kind}"
    out.update(_POOLER)
    out.update(_MLM_HEAD)
    out.update(_NSP_HEAD)
    return out


_MODERNBERT = {  # ours -> transformers' ModernBertForMaskedLM, outside the blocks
    "bert.embeddings.word.weight": "model.embeddings.tok_embeddings.weight",
    "bert.embeddings.norm.weight": "model.embeddings.norm.weight",
    "bert.final_norm.weight": "model.final_norm.weight",
}
_MODERNBERT_LAYER = {  # ours (under bert.layers.{i}.) -> theirs (under model.layers.{i}.); weights only
    "attn_norm": "attn_norm", "qkv": "attn.Wqkv", "out": "attn.Wo",
    "mlp_norm": "mlp_norm", "mlp_in": "mlp.Wi", "mlp_out": "mlp.Wo",
}
_MODERNBERT_HEAD = {"mlm.dense.weight": "head.dense.weight", "mlm.norm.weight": "head.norm.weight",
                    "mlm.bias": "decoder.bias"}


def modernbert_key_map(num_layers: int) -> dict[str, str]:
    """Our ModernBERT state-dict key -> transformers `ModernBertForMaskedLM`'s (its decoder.weight is tied to
    the token embeddings and not stored). The first block has no attn_norm (the embeddings' norm serves)."""
    out = dict(_MODERNBERT)
    for i in range(num_layers):
        for ours, theirs in _MODERNBERT_LAYER.items():
            if i > 0 or ours != "attn_norm":
                out[f"bert.layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    out.update(_MODERNBERT_HEAD)
    return out


# -- export -----------------------------------------------------------------------------------------------


def hf_state(model: torch.nn.Module, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Our fp32 weights under their names, for the keys of `names` the model has. A model trained without
    the blocks' linear biases (`linear_bias=False`) gets explicit zero biases: BERT's layout, same outputs."""
    state = model.state_dict()
    out = {}
    for ours, theirs in names.items():
        if ours in state:
            out[theirs] = state[ours].detach().to("cpu", torch.float32).contiguous()
        elif ours.startswith("bert.layers.") and ours.endswith(".bias"):
            out[theirs] = torch.zeros(state[ours.removesuffix("bias") + "weight"].shape[0])
    return out


def hf_config(cfg: ModelConfig, architecture: str) -> dict:
    return {
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def modernbert_hf_config(cfg: ModelConfig, tokenizer: Tokenizer, global_theta: float | None = None) -> dict:
    """transformers' ModernBertConfig for our shape. Both spellings of the attention pattern and the rotary
    bases are written: `layer_types` / `rope_parameters` (transformers 5) and `global_attn_every_n_layers` /
    `*_rope_theta` (transformers 4.48+). `global_theta`: the base the weights were last trained with, when a
    length schedule's short phases used another (default: the config's)."""
    sp = tokenizer.special
    global_theta = cfg.global_rope_theta if global_theta is None else global_theta
    return {
        "architectures": ["ModernBertForMaskedLM"],
        "model_type": "modernbert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_activation": "gelu",
        "max_position_embeddings": cfg.max_position,
        "initializer_range": cfg.init_std,
        "initializer_cutoff_factor": 2.0,
        "norm_eps": cfg.layer_norm_eps,
        "norm_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "decoder_bias": True,
        "attention_dropout": cfg.attention_dropout,
        "embedding_dropout": cfg.hidden_dropout,
        "mlp_dropout": cfg.hidden_dropout,
        "local_attention": cfg.local_attention,
        "global_attn_every_n_layers": cfg.global_every,
        "layer_types": ["full_attention" if i % cfg.global_every == 0 else "sliding_attention" for i in range(cfg.num_layers)],
        "global_rope_theta": global_theta,
        "local_rope_theta": cfg.local_rope_theta,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": global_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}},
        "pad_token_id": sp.pad, "cls_token_id": sp.cls, "sep_token_id": sp.sep, "bos_token_id": sp.cls,
        "eos_token_id": sp.sep,
        "classifier_pooling": "cls",
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def export_model(model: BertForPreTraining, tokenizer: Tokenizer, out: str | Path, *, nsp: bool = False,
                 lowercase: bool | None = None) -> Path:
    """Write a `transformers` folder: config.json, model.safetensors and tokenizer files.

    BERT: with `nsp`, the architecture is `BertForPreTraining` (pooler and NSP head included); otherwise
    `BertForMaskedLM` (what the run trained). ModernBERT: `ModernBertForMaskedLM`.
    """
    if model.config.arch == "modernbert":
        return _write_folder(out, hf_state(model, modernbert_key_map(model.config.num_layers)),
                             modernbert_hf_config(model.config, tokenizer, model.bert.global_theta), tokenizer, lowercase)
    skip = set() if nsp else set(_POOLER) | set(_NSP_HEAD)
    names = {k: v for k, v in key_map(model.config.num_layers).items() if k not in skip}
    architecture = "BertForPreTraining" if nsp else "BertForMaskedLM"
    return _write_folder(out, hf_state(model, names), hf_config(model.config, architecture), tokenizer, lowercase)


def export_trained(model: BertForPreTraining, tokenizer: Tokenizer, cfg: Config, out: str | Path) -> Path:
    """Export a model pre-trained with `cfg` (its heads and its tokenizer's casing follow the config)."""
    return export_model(model, tokenizer, out, nsp=cfg.train.pair_task is not None,
                        lowercase=cfg.data.lowercase if cfg.data.tokenizer == "wordpiece" else None)


def export_classifier(model, tokenizer: Tokenizer, labels: list[str], out: str | Path, *,
                      lowercase: bool | None = None) -> Path:
    """Write a fine-tuned classifier as a transformers `BertForSequenceClassification` (or
    `ModernBertForSequenceClassification`) folder."""
    cfg = model.config
    labels_cfg = dict(id2label={str(i): label for i, label in enumerate(labels)},
                      label2id={label: i for i, label in enumerate(labels)},
                      classifier_dropout=model.dropout.p, problem_type="single_label_classification")
    if cfg.arch == "modernbert":
        names = {k: v for k, v in modernbert_key_map(cfg.num_layers).items() if not k.startswith("mlm.")}
        names.update({"head.dense.weight": "head.dense.weight", "head.norm.weight": "head.norm.weight",
                      "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"})
        config = {**modernbert_hf_config(cfg, tokenizer), **labels_cfg,
                  "architectures": ["ModernBertForSequenceClassification"]}
        return _write_folder(out, hf_state(model, names), config, tokenizer, lowercase)
    names = {**key_map(cfg.num_layers), "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}
    config = {**hf_config(cfg, "BertForSequenceClassification"), **labels_cfg}
    return _write_folder(out, hf_state(model, names), config, tokenizer, lowercase)


def _write_folder(out: str | Path, state: dict[str, torch.Tensor], config: dict, tokenizer: Tokenizer,
                  lowercase: bool | None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write(out / CONFIG, json.dumps(config, indent=2) + "\n")
    save_hf_tokenizer(tokenizer, out, max_length=config["max_position_embeddings"], lowercase=lowercase)
    return out


def save_hf_tokenizer(tokenizer: Tokenizer, out: Path, *, max_length: int, lowercase: bool | None) -> None:
    """tokenizer.json (+ vocab.txt) and the small JSON files AutoTokenizer reads for special tokens."""
    tokenizer.save(out)
    specials = {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK}
    if tokenizer.kind == "wordpiece":
        # BertTokenizerFast reads tokenizer.json; vocab.txt lets the slow BertTokenizer load too.
        if lowercase is None:
            lowercase = _is_lowercasing(tokenizer)
        tok_cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase}
    else:
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
    tok_cfg.update(specials, model_max_length=max_length, clean_up_tokenization_spaces=False)
    atomic_write(out / "tokenizer_config.json", json.dumps(tok_cfg, indent=2) + "\n")
    atomic_write(out / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")


def _is_lowercasing(tokenizer: Tokenizer) -> bool:
    norm = json.loads(tokenizer.hf.to_str()).get("normalizer") or {}
    return bool(norm.get("lowercase", False))


# -- import -----------------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    architecture: str  # what the checkpoint held: BertModel, BertForMaskedLM or BertForPreTraining
    initialised: list[str] = field(default_factory=list)  # heads absent from the checkpoint (fresh weights)
    ignored: list[str] = field(default_factory=list)  # tensors of other heads (e.g. a classifier), not used

    def describe(self) -> str:
        fresh = f"; newly initialised: {', '.join(self.initialised)}" if self.initialised else ""
        extra = f"; ignored: {', '.join(self.ignored[:4])}{' ...' if len(self.ignored) > 4 else ''}" if self.ignored else ""
        return f"loaded {self.architecture} weights{fresh}{extra}"


def is_hf_folder(path: str | Path) -> bool:
    p = Path(path) / CONFIG
    if not p.is_file():
        return False
    try:
        return "model_type" in json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_hf_config(folder: Path) -> ModelConfig:
    """Our ModelConfig from a transformers config.json; refuses what is not a BERT or ModernBERT we can run."""
    path = folder / CONFIG
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read a transformers config ({e})") from None
    if not isinstance(c, dict):
        raise UserError(f"{path}: a transformers config must be a JSON object")
    if c.get("model_type") == "modernbert":
        return _read_modernbert_config(c, path)
    if c.get("model_type") != "bert":
        raise UserError(f"{path}: model_type is {c.get('model_type')!r}; only BERT and ModernBERT checkpoints "
                        "(model_type 'bert' or 'modernbert') can be imported")
    problems = []
    if c.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {c.get('hidden_act')!r} (only exact 'gelu')")
    if c.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {c.get('position_embedding_type')!r} (only 'absolute')")
    if c.get("is_decoder") or c.get("add_cross_attention"):
        problems.append("a decoder / cross-attention configuration")
    problems += _shape_problems(c)
    if problems:
        raise UserError(f"{path}: unsupported BERT variant: {'; '.join(problems)}")
    return ModelConfig(
        arch="bert", preset=None, num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
        num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
        max_position=c.get("max_position_embeddings", 512), type_vocab_size=c.get("type_vocab_size", 2),
        hidden_dropout=c.get("hidden_dropout_prob", 0.1), attention_dropout=c.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=c.get("layer_norm_eps", 1e-12), init_std=c.get("initializer_range", 0.02),
        vocab_size=c["vocab_size"], pad_token_id=c.get("pad_token_id") or 0)


def _shape_problems(c: dict) -> list[str]:
    """What BERT and ModernBERT configs both need: tied embeddings and the integer shape fields."""
    problems = ["untied word embeddings and decoder"] if c.get("tie_word_embeddings") is False else []
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    missing = [k for k in required if not isinstance(c.get(k), int)]
    return problems + ([f"missing {', '.join(missing)}"] if missing else [])


def _read_modernbert_config(c: dict, path: Path) -> ModelConfig:
    problems = []
    for key in ("attention_bias", "mlp_bias", "norm_bias"):
        if c.get(key):
            problems.append(f"{key} true (ModernBERT's linears and norms have no biases)")
    if c.get("decoder_bias") is False:
        problems.append("decoder_bias false")
    if c.get("hidden_activation", "gelu") != "gelu" or c.get("classifier_activation", "gelu") != "gelu":
        problems.append("an activation other than exact 'gelu'")
    problems += _shape_problems(c)
    layers = c.get("num_hidden_layers") if isinstance(c.get("num_hidden_layers"), int) else 0
    every = c.get("global_attn_every_n_layers", 3)
    if not isinstance(every, int) or every < 1:
        problems.append(f"global_attn_every_n_layers {every!r} (a positive integer)")
        every = 3
    types = c.get("layer_types")
    if isinstance(types, list):  # transformers 5 writes the pattern out; we run "global at every Nth from 0"
        fits = [n for n in range(1, layers + 1)
                if types == ["full_attention" if i % n == 0 else "sliding_attention" for i in range(layers)]]
        if not fits:
            problems.append(f"layer_types {types!r} is not 'global every Nth layer from the first'")
        every = fits[0] if fits else every
    rope = c.get("rope_parameters") if isinstance(c.get("rope_parameters"), dict) else {}
    kinds = [r.get("rope_type", "default") for r in rope.values() if isinstance(r, dict)]
    if any(k != "default" for k in kinds):
        problems.append(f"rope_type {kinds!r} (only 'default' rotary embeddings)")
    if problems:
        raise UserError(f"{path}: unsupported ModernBERT variant: {'; '.join(problems)}")

    def theta(kind: str, old_key: str, default: float) -> float:
        r = rope.get(kind)
        return float(r["rope_theta"]) if isinstance(r, dict) and "rope_theta" in r else float(c.get(old_key, default))

    return ModelConfig(
        arch="modernbert", preset=None, num_layers=layers, hidden_size=c["hidden_size"],
        num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
        max_position=c.get("max_position_embeddings", 8192), hidden_dropout=c.get("mlp_dropout", 0.0),
        attention_dropout=c.get("attention_dropout", 0.0), layer_norm_eps=c.get("norm_eps", 1e-5),
        init_std=c.get("initializer_range", 0.02), local_attention=c.get("local_attention", 128),
        global_every=every, global_rope_theta=theta("full_attention", "global_rope_theta", 160_000.0),
        local_rope_theta=theta("sliding_attention", "local_rope_theta", 10_000.0),
        vocab_size=c["vocab_size"], pad_token_id=c.get("pad_token_id") or 0)


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint: model.safetensors (single or sharded), else
    pytorch_model.bin through torch.load(weights_only=True) — never an arbitrary pickle."""
    single, index = folder / WEIGHTS, folder / f"{WEIGHTS}.index.json"
    files: list[Path] = []
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        outside = [s for s in shards if not isinstance(s, str) or (folder / s).resolve().parent != folder.resolve()]
        if outside:
            raise UserError(f"{index}: shard {outside[0]!r} is not a file in {folder}; refusing to read it")
        files = [folder / s for s in shards]
    if files:
        state = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        state[k] = sf.get_tensor(k)
            except (SafetensorError, OSError) as e:
                raise UserError(f"{f}: cannot read safetensors ({e})") from None
        return state
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise UserError(f"{legacy}: cannot read with weights_only=True ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(state, dict):
            raise UserError(f"{legacy}: expected a state dict")
        return state
    raise UserError(f"{folder}: no model.safetensors (or model.safetensors.index.json, pytorch_model.bin)")


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put every key in BertForPreTraining's form: 'bert.' prefix, LayerNorm weight/bias (not gamma/beta)."""
    out = {}
    for k, v in state.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if k.startswith(("embeddings.", "encoder.", "pooler.")):
            k = "bert." + k
        out[k] = v
    return out


def load_hf(folder: str | Path) -> tuple[BertForPreTraining, Tokenizer, ImportReport]:
    """A transformers BERT or ModernBERT folder as our model (eval mode, CPU), its tokenizer and what was
    initialised fresh."""
    folder = Path(folder)
    cfg = read_hf_config(folder)
    tokenizer = Tokenizer.from_file(folder)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size} embeddings")
    if cfg.arch == "modernbert":
        return _load_modernbert(folder, cfg, tokenizer)
    state = _normalise_keys(_read_hf_weights(folder))
    torch.manual_seed(0)  # heads that the checkpoint lacks get a reproducible initialisation
    model = BertForPreTraining(cfg)
    names = key_map(cfg.num_layers)
    ours = model.state_dict()
    body = {k for k in names if k.startswith("bert.") and k not in _POOLER}
    missing_body = sorted(names[k] for k in body if names[k] not in state)
    if missing_body:
        raise UserError(f"{folder}: not a complete BERT encoder: missing {', '.join(missing_body[:3])}"
                        f"{f' and {len(missing_body) - 3} more' if len(missing_body) > 3 else ''}")
    _check_shapes_and_tie(folder, state, names, ours, "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")
    report = ImportReport("BertModel")
    groups = [("pooler", _POOLER), ("MLM head", _MLM_HEAD), ("NSP head", _NSP_HEAD)]
    present = {name: all(t in state for t in keys.values()) for name, keys in groups}
    if present["MLM head"]:
        report.architecture = "BertForPreTraining" if present["NSP head"] else "BertForMaskedLM"
    loaded = {k: state[t].to(torch.float32) for k, t in names.items() if t in state}
    for name, keys in groups:
        if not present[name]:
            report.initialised.append(name)
            for k in keys:
                loaded.pop(k, None)
    with torch.no_grad():
        for k, v in loaded.items():
            ours[k].copy_(v)
    report.ignored = sorted(set(state) - set(names.values()) - set(_TIED) - {"bert.embeddings.position_ids"})
    return model.eval(), tokenizer, report


def _check_shapes_and_tie(folder: Path, state: dict, names: dict[str, str], ours: dict, decoder_key: str,
                          embeddings_key: str) -> None:
    """Every tensor the key map names has our shape, and a stored decoder equals the word embeddings."""
    wrong = [(t, tuple(state[t].shape), tuple(ours[k].shape)) for k, t in names.items()
             if t in state and tuple(state[t].shape) != tuple(ours[k].shape)]
    if wrong:
        theirs, got, want = wrong[0]
        raise UserError(f"{folder}: {theirs} has shape {got}, config.json implies {want}")
    decoder = state.get(decoder_key)
    if decoder is not None and not torch.equal(decoder, state[embeddings_key]):
        raise UserError(f"{folder}: the MLM decoder is not tied to the word embeddings; maskedlm needs tied weights")


def _load_modernbert(folder: Path, cfg: ModelConfig, tokenizer: Tokenizer):
    state = {}
    for k, v in _read_hf_weights(folder).items():  # a ModernBertModel's keys lack the "model." prefix
        state["model." + k if k.startswith(("embeddings.", "layers.", "final_norm.")) else k] = v
    torch.manual_seed(0)  # a head that the checkpoint lacks gets a reproducible initialisation
    model = ModernBertForPreTraining(cfg)
    names, ours = modernbert_key_map(cfg.num_layers), model.state_dict()
    body = [t for k, t in names.items() if k.startswith("bert.")]
    missing = [t for t in body if t not in state]
    if missing:
        raise UserError(f"{folder}: not a complete ModernBERT encoder: missing {', '.join(missing[:3])}"
                        f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}")
    _check_shapes_and_tie(folder, state, names, ours, "decoder.weight", "model.embeddings.tok_embeddings.weight")
    head = all(t in state for t in _MODERNBERT_HEAD.values())
    report = ImportReport("ModernBertForMaskedLM" if head else "ModernBertModel", [] if head else ["MLM head"])
    with torch.no_grad():
        for k, t in names.items():
            if t in state and (head or k not in _MODERNBERT_HEAD):
                ours[k].copy_(state[t].to(torch.float32))
    report.ignored = sorted(set(state) - set(names.values()) - {"decoder.weight"})
    return model.eval(), tokenizer, report
