"""Typed configuration: the single source of truth for a run.

Four dataclasses (model, data, mask, train) grouped in `Config`. A config file (YAML, TOML or JSON) maps
onto them section by section; command-line flags override the file; unknown keys and wrong types are
errors. Every field is exposed as exactly one CLI flag (named after the field unless `flag` says
otherwise), so the CLI cannot drift from the config.

The resolved config (tokenizer vocabulary filled in, defaults applied) is what a run writes to
`config.json`, and what `maskedlm.load` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .errors import UserError


# What `--resume` does when a setting differs from the checkpoint's (every field must say):
#   free    applied, and listed as changed (when to stop, logging, checkpoint cadence, the device)
#   fixed   changes what the run computes: refused with the difference, unless --allow-config-change (then
#           applied and listed)
#   never   refused even with --allow-config-change: the checkpoint decides it (shape, tokenizer, objective,
#           optimizer kind, how the model was initialised)
#   ignore  not a setting of the run (the resume flags themselves, derived values, the preset's name)
ResumePolicy = Literal["free", "fixed", "never", "ignore"]


def _f(default: Any = dataclasses.MISSING, *, help: str, resume: ResumePolicy, flag: str | None = None,
       cli: bool = True, derived: bool = False, factory: Any = None):
    """A dataclass field with its CLI help and its resume policy. `derived` fields are filled in by the
    run, not by users."""
    meta = {"help": help, "flag": flag, "cli": cli and not derived, "derived": derived, "resume": resume}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# -- values with their own small grammar, parsed once when the config is built ------------------------------


@dataclass(frozen=True)
class SeqLenSchedule:
    """A sequence-length curriculum. `phases`: (length, end of the phase as a fraction of the run), the last
    ending at 1.0. Written as 'L:fraction,...' (fractions of the run adding up to 1; '64:0.9,128:0.1' ->
    (64, 0.9), (128, 1.0)) or 'ramp:FROM:TO[:STEP]' (equal phases from FROM to TO in steps of STEP, 16 by
    default; 'ramp:64:128:32' -> (64, 1/3), (96, 2/3), (128, 1.0))."""

    spec: str
    phases: tuple[tuple[int, float], ...]

    @classmethod
    def parse(cls, spec: str) -> "SeqLenSchedule":
        where = f"train.seq_len_schedule {spec!r}"
        try:
            if spec.startswith("ramp:"):
                parts = [int(x) for x in spec.split(":")[1:]]
                lo, hi, step = (parts + [16])[:3] if len(parts) in (2, 3) else (0, 0, 0)
                if not (8 <= lo < hi and step > 0):
                    raise ValueError
                lengths = list(range(lo, hi, step)) + [hi]
                given = [(n, 1.0 / len(lengths)) for n in lengths]
            else:
                given = []
                for part in spec.split(","):
                    length, frac = part.split(":")
                    given.append((int(length), float(frac)))
        except ValueError:
            raise UserError(f"{where}: expected 'L:fraction,...' or 'ramp:FROM:TO[:STEP]'") from None
        if any(n < 8 or not f > 0 for n, f in given):
            raise UserError(f"{where}: lengths must be >= 8 and fractions > 0")
        if abs(sum(f for _, f in given) - 1.0) > 1e-6:
            raise UserError(f"{where}: the fractions add up to {sum(f for _, f in given):g}, not 1")
        phases, end = [], 0.0
        for n, f in given:
            end += f
            phases.append((n, end))
        phases[-1] = (phases[-1][0], 1.0)
        return cls(spec, tuple(phases))

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class BatchRamp:
    """A batch-size warmup 'START:FRACTION': from START sequences to the full batch, linearly over that
    fraction of the run ('8:0.1')."""

    spec: str
    start: int
    frac: float

    @classmethod
    def parse(cls, spec: str) -> "BatchRamp":
        try:
            start, frac = spec.split(":")
            out = cls(spec, int(start), float(frac))
        except ValueError:
            raise UserError(f"train.batch_ramp {spec!r}: expected 'START:FRACTION', e.g. 8:0.1") from None
        if out.start < 1 or not 0 < out.frac <= 1:
            raise UserError(f"train.batch_ramp {spec!r}: START must be >= 1 and FRACTION in (0, 1]")
        return out

    def __str__(self) -> str:
        return self.spec


# ModernBERT's own shapes (Warner et al. 2024): (layers, hidden, heads, GeGLU width).
MODERNBERT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "modernbert-base": (22, 768, 12, 1152),
    "modernbert-large": (28, 1024, 16, 2624),
}
# Google's BERT miniatures (Turc et al. 2019) plus base and large: (layers, hidden). heads = H/64, FFN = 4H.
# Under --arch modernbert the same (layers, hidden) get a GeGLU width with BERT's FFN parameter count
# (3 H I = 8 H^2, rounded to a multiple of 64).
PRESETS: dict[str, tuple[int, int]] = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
    "large": (24, 1024),
}


def _ffn_width(arch: str, hidden: int) -> int:
    """A preset's feed-forward width: BERT's 4H, or a GeGLU width with the parameters of BERT's 4H (3 H I = 8 H^2)."""
    return round(8 * hidden / 3 / 64) * 64 if arch == "modernbert" else 4 * hidden


@dataclass
class ModelConfig:
    arch: Literal["bert", "modernbert"] = _f("modernbert", resume="never", help="the encoder: ModernBERT (pre-LN, rotary positions, GeGLU, no "
                                                   "biases, local/global attention; exports as ModernBertForMaskedLM; leaves the MLM "
                                                   "plateau ~10x sooner, BENCHMARKS.md) or BERT (2019; exports as BertForMaskedLM; "
                                                   "needed for --objective mlm+nsp/mlm+sop)")
    preset: Optional[str] = _f("mini", flag="--model", resume="ignore", help=f"size preset: {', '.join([*PRESETS, *MODERNBERT_PRESETS])} (sets the shape fields below; "
                                                                          "the modernbert-* ones also set --arch modernbert)")
    num_layers: int = _f(4, resume="never", help="transformer blocks")
    hidden_size: int = _f(256, resume="never", help="model width H")
    num_heads: int = _f(4, resume="never", help="attention heads (H must divide by it)")
    intermediate_size: int = _f(704, resume="never", help="feed-forward width (ModernBERT: of each GeGLU half)")
    max_position: Optional[int] = _f(None, resume="never", help="longest sequence the model accepts (BERT: rows of its position table); "
                                                          "default ModernBERT's 8192, BERT's 512")
    type_vocab_size: int = _f(2, resume="never", help="token-type (segment) embeddings")
    hidden_dropout: float = _f(0.0, resume="fixed", help="dropout on embeddings and block outputs (BERT used 0.1; 0 is faster, as Cramming and ModernBERT pre-train)")
    attention_dropout: float = _f(0.0, resume="fixed", help="dropout on attention probabilities (BERT used 0.1)")
    linear_bias: bool = _f(True, resume="never", help="BERT: biases in the blocks' linear layers; --no-linear-bias is 4-8 percent faster on "
                                      "CPU (as Cramming trains) and exports to transformers as zero biases (ModernBERT has none either way)")
    layer_norm_eps: Optional[float] = _f(None, resume="fixed", help="LayerNorm epsilon (default ModernBERT's 1e-5, BERT's 1e-12)")
    init_std: float = _f(0.02, resume="never", help="std of the normal weight initialisation")
    qk_init_std: Optional[float] = _f(None, resume="never", help="std of the initial query and key weights (default: --init-std); "
                                                  "larger values start attention away from uniform averaging")
    position_init: Literal["normal", "sinusoidal"] = _f("normal", resume="never", help="initial position table: normal like every weight (BERT), "
                                                        "or sinusoids (Vaswani et al.) of the same RMS; learned either way")
    mlm_bias_init: Literal["zero", "unigram"] = _f("zero", resume="never", help="initial MLM output bias: zero (BERT), or the log unigram "
                                                  "frequencies of the training tokens, so the head starts at the unigram guess")
    local_attention: int = _f(128, resume="never", help="modernbert: the local layers' sliding window in tokens (a token sees "
                                                         "those within half of it on either side)")
    global_every: int = _f(3, resume="never", help="modernbert: every Nth layer, from the first, attends globally; the others locally")
    global_rope_theta: float = _f(160_000.0, resume="never", help="modernbert: rotary base of the global layers")
    local_rope_theta: float = _f(10_000.0, resume="never", help="modernbert: rotary base of the local layers")
    vocab_size: int = _f(0, derived=True, resume="ignore", help="set from the tokenizer")
    pad_token_id: int = _f(0, derived=True, resume="ignore", help="set from the tokenizer")

    def __post_init__(self) -> None:
        self._arch_defaults(keep=True)

    def _arch_defaults(self, keep: bool) -> None:
        """The settings whose default depends on the architecture (`keep`: only where unset)."""
        modern = self.arch == "modernbert"
        if not keep or self.layer_norm_eps is None:
            self.layer_norm_eps = 1e-5 if modern else 1e-12
        if not keep or self.max_position is None:
            self.max_position = 8192 if modern else 512  # rotary has no table; BERT's has 512 rows

    def switch_arch(self, arch: str) -> None:
        """Another architecture for the same shape: what depends on the architecture follows (norm epsilon,
        longest sequence, and a preset's feed-forward width); layers, width and heads stay."""
        if arch == self.arch:
            return
        self.arch = arch
        self._arch_defaults(keep=False)
        if self.preset in PRESETS:
            self.intermediate_size = _ffn_width(self.arch, self.hidden_size)

    def apply_preset(self, name: str) -> None:
        if name in MODERNBERT_PRESETS:
            self.arch = "modernbert"
            self.num_layers, self.hidden_size, self.num_heads, self.intermediate_size = MODERNBERT_PRESETS[name]
        elif name in PRESETS:
            layers, hidden = PRESETS[name]
            self.num_layers, self.hidden_size, self.num_heads = layers, hidden, hidden // 64
            self.intermediate_size = _ffn_width(self.arch, hidden)
        else:
            raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join([*PRESETS, *MODERNBERT_PRESETS])}")
        self.preset = name
        self._arch_defaults(keep=False)


@dataclass
class DataConfig:
    corpus: Optional[str] = _f("shakespeare", resume="fixed", help="embedded corpus used when --train is not given ('shakespeare')")
    train: list[str] = _f(factory=list, resume="fixed", help="training text: files or folders (.txt, .md, .jsonl, optionally .gz; .parquet; a datasets folder)")
    valid: list[str] = _f(factory=list, resume="fixed", help="held-out text; default: a fraction of the training documents")
    valid_fraction: float = _f(0.05, resume="fixed", help="fraction of documents held out when --valid is not given")
    doc_boundary: Literal["blank_line", "file"] = _f("blank_line", resume="fixed", help="in .txt files, documents are separated by blank lines, or one per file")
    text_field: str = _f("text", resume="fixed", help="JSON field holding the text in .jsonl files")
    strict_utf8: bool = _f(False, resume="fixed", help="refuse invalid UTF-8 (naming file and line) instead of replacing it")
    tokenizer: str = _f("wordpiece", resume="never", help="'wordpiece' (trained on the training text), 'char', or a tokenizer.json / vocab.txt path")
    vocab_size: int = _f(8192, resume="never", help="vocabulary size of a trained WordPiece tokenizer")
    lowercase: bool = _f(True, resume="never", help="lowercase text in trained tokenizers (BERT 'uncased')")
    seq_len: int = _f(128, resume="fixed", help="tokens per training sequence, [CLS] and [SEP] included (the final length under a schedule)")
    short_seq_prob: float = _f(0.1, resume="fixed", help="sentence pairs: probability of a shorter random target length (BERT's)")
    cache_dir: Optional[str] = _f(None, resume="free", help="where prepared data is cached (default: $MASKEDLM_CACHE or ~/.cache/maskedlm)")
    workers: int = _f(0, resume="free", help="processes tokenising inputs in parallel (0: one per CPU core)")
    tokenizer_train_bytes: int = _f(1_000_000_000, resume="never", help="characters of training text a trained tokenizer learns from (a sample of big corpora)")


@dataclass
class MaskConfig:
    mask_prob: float = _f(0.15, resume="fixed", help="fraction of (non-special) tokens selected for prediction")
    mask_token_frac: float = _f(0.8, resume="fixed", help="of the selected, the fraction replaced by [MASK]")
    random_token_frac: float = _f(0.1, resume="fixed", help="of the selected, the fraction replaced by a random token (the rest stay unchanged)")
    strategy: Literal["token", "whole_word", "span"] = _f("token", flag="--masking", resume="fixed", help="what is selected: single tokens (BERT), whole words, or spans (SpanBERT)")
    span_p: float = _f(0.2, resume="fixed", help="span masking: parameter of the geometric span-length distribution")
    span_max: int = _f(10, resume="fixed", help="span masking: longest span")


@dataclass
class TrainConfig:
    objective: Literal["mlm", "mlm+nsp", "mlm+sop"] = _f("mlm", resume="never", help="masked LM alone, or with next-sentence / sentence-order prediction on sentence pairs")
    seq_len_schedule: Optional[SeqLenSchedule] = _f(None, resume="fixed", help="sequence-length curriculum: 'L:fraction,...' (e.g. 64:0.9,128:0.1) or 'ramp:FROM:TO[:STEP]'; ends at --seq-len")
    short_rope_theta: Optional[float] = _f(None, resume="fixed", help="modernbert under --seq-len-schedule: the global layers' rotary base in "
                                                          "the phases before the last, which uses --global-rope-theta (ModernBERT's context "
                                                          "extension: 10000 at 1,024 tokens, then 160000 at 8,192)")
    schedule_keep_tokens: bool = _f(True, resume="fixed", help="under a length schedule, scale the batch so each step has the same number of tokens")
    batch_size: int = _f(32, resume="fixed", help="sequences per optimizer step, over all ranks (split over --grad-accum micro-batches)")
    batch_ramp: Optional[BatchRamp] = _f(None, resume="fixed", help="batch-size warmup 'START:FRACTION': from START sequences to --batch-size, linearly over that fraction of the run")
    optimizer: Literal["adamw", "lamb"] = _f("adamw", resume="never", help="AdamW, or LAMB for large global batches")
    grad_accum: int = _f(1, resume="fixed", help="micro-batches per optimizer step")
    doc_masking: bool = _f(False, resume="fixed", help="packed sequences: each token attends only within its own document (a document "
                                       "ends at its [SEP]), not across the boundaries packing creates")
    lr: float = _f(1e-3, resume="fixed", help="peak learning rate")
    weight_decay: float = _f(0.01, resume="fixed", help="AdamW weight decay (not applied to biases and norms)")
    adam_beta1: float = _f(0.9, resume="fixed", help="AdamW beta1")
    adam_beta2: float = _f(0.98, resume="fixed", help="AdamW beta2")
    adam_eps: float = _f(1e-6, resume="fixed", help="AdamW epsilon")
    warmup_frac: float = _f(0.06, resume="fixed", help="fraction of the run spent warming the learning rate up")
    schedule: Literal["linear", "cosine", "wsd"] = _f("linear", resume="fixed", help="decay after warmup: linear, cosine, or "
                                                      "warmup-stable-decay (constant, then linear over --decay-frac)")
    decay_frac: float = _f(0.2, resume="fixed", help="wsd schedule: the final fraction of the run over which the LR decays")
    min_lr_frac: float = _f(0.0, resume="fixed", help="final learning rate as a fraction of the peak")
    clip_grad: float = _f(1.0, resume="fixed", help="gradient-norm clipping (0 disables)")
    max_steps: Optional[int] = _f(None, resume="free", help="stop after this many optimizer steps")
    time_budget: Optional[float] = _f(None, resume="free", help="stop after this many seconds of training; the LR schedule follows elapsed time")
    init_from: Optional[str] = _f(None, resume="never", help="start from this model: a Hugging Face BERT or ModernBERT folder, or a maskedlm run (its tokenizer and shape too)")
    seed: int = _f(0, resume="fixed", help="seed for initialisation, data order and masks")
    device: str = _f("auto", resume="free", help="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    precision: Literal["auto", "bf16", "fp32"] = _f("auto", resume="fixed", help="'auto' uses bf16 autocast where the device has fast bf16")
    threads: Optional[int] = _f(None, resume="free", help="CPU training: PyTorch threads (default: one per available CPU that other processes "
                                                          "leave free, followed while the run trains; more threads than free CPUs make steps "
                                                          "many times slower)")
    compile: bool = _f(False, resume="free", help="torch.compile the encoder (compile time is reported separately)")
    log_every: int = _f(10, resume="free", help="steps between metric records")
    eval_every: int = _f(250, resume="free", help="steps between held-out evaluations (0: only at the end)")
    eval_seconds: float = _f(0.0, resume="free", help="also evaluate every this many seconds of training (0: by steps only)")
    eval_sequences: int = _f(512, resume="fixed", help="held-out sequences per evaluation (fixed masks)")
    eval_seed: int = _f(1234, resume="fixed", help="seed of the fixed evaluation masks")
    out: Optional[str] = _f(None, resume="ignore", help="run folder (default: runs/<date>-<time>)")
    resume: Optional[str] = _f(None, resume="ignore", help="continue a run exactly: its folder (latest checkpoint) or a checkpoint folder")
    allow_config_change: bool = _f(False, resume="ignore", help="let --resume change settings that alter the run's meaning (batch size, data, shape, ...)")
    checkpoint_every: int = _f(1000, resume="free", help="steps between checkpoints (0: none but the last)")
    checkpoint_minutes: float = _f(30.0, resume="free", help="minutes between checkpoints (0: no time-based checkpoints)")
    keep_checkpoints: int = _f(3, resume="free", help="checkpoints kept (the newest; never the one resumed from)")
    max_nonfinite: int = _f(5, resume="free", help="consecutive steps with a non-finite loss or gradient (each skipped) before aborting")
    dist_timeout: float = _f(600.0, resume="free", help="seconds a rank waits for its peers before the job fails (torchrun)")
    parallel: Literal["ddp", "fsdp"] = _f("ddp", resume="fixed", help="under torchrun: replicate the model (DDP) or shard it (FSDP2, for models that do not fit one device)")
    sample: bool = _f(True, resume="free", help="print held-out lines with the model's predictions at the end")
    probe: Optional[bool] = _f(None, resume="free", help="run the genre probe at the end (default: when training on the embedded corpus)")
    tensorboard: bool = _f(False, resume="free", help="also log metrics to TensorBoard (RUN/tensorboard; needs the tensorboard package)")
    plot: bool = _f(True, resume="free", help="draw RUN/metrics.png at the end (needs matplotlib)")

    @property
    def pair_task(self) -> Optional[Literal["nsp", "sop"]]:
        """The sentence-pair task trained beside MLM ('nsp' or 'sop'), or None for MLM alone."""
        return {"mlm": None, "mlm+nsp": "nsp", "mlm+sop": "sop"}[self.objective]


@dataclass
class FinetuneConfig:
    """`maskedlm finetune`: sequence classification on the pooled [CLS] of a pre-trained encoder."""

    train: str = _f("", resume="ignore", help="labelled training examples: a .csv (with a header) or .jsonl file")
    valid: str = _f("", resume="ignore", help="labelled validation examples (same columns); early stopping and the reported metrics")
    text_col: str = _f("text", resume="ignore", help="column with the text")
    text_pair_col: Optional[str] = _f(None, resume="ignore", help="column with a second text, for sentence-pair tasks")
    label_col: str = _f("label", resume="ignore", help="column with the label (any string or integer)")
    max_len: int = _f(128, resume="ignore", help="longest input in tokens ([CLS] and [SEP] included); longer ones are truncated")
    batch_size: int = _f(32, resume="ignore", help="examples per step")
    lr: float = _f(5e-5, resume="ignore", help="peak learning rate (AdamW, linear warmup and decay)")
    epochs: int = _f(5, resume="ignore", help="most epochs")
    warmup_frac: float = _f(0.1, resume="ignore", help="fraction of the steps warming the learning rate up")
    weight_decay: float = _f(0.01, resume="ignore", help="AdamW weight decay")
    clip_grad: float = _f(1.0, resume="ignore", help="gradient-norm clipping (0 disables)")
    patience: int = _f(2, resume="ignore", help="stop after this many epochs without a better validation accuracy")
    dropout: float = _f(0.1, resume="ignore", help="dropout before the classifier")
    seed: int = _f(0, resume="ignore", help="seed for the classifier's initialisation and the data order")
    device: str = _f("auto", resume="ignore", help="'auto', 'cpu', 'cuda', ...")
    out: Optional[str] = _f(None, resume="ignore", help="output folder (default: RUN/finetuned-<train file name>)")

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "FinetuneConfig":
        """Strict about keys and types, as `Config.from_dict`; validated."""
        cfg = cls()
        _update_section(cfg, "finetune", values, False, source)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _require([
            (bool(self.train and self.valid), "finetune needs --train FILE and --valid FILE"),
            (self.max_len >= 3, "finetune.max_len must be >= 3 ([CLS], a token, [SEP])"),
            (self.batch_size >= 1 and self.epochs >= 1 and self.patience >= 1,
             "finetune.batch_size, finetune.epochs and finetune.patience must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "finetune.lr must be a positive number"),
            (0.0 <= self.warmup_frac < 1.0, "finetune.warmup_frac must be in [0, 1)"),
            (self.weight_decay >= 0 and self.clip_grad >= 0, "finetune.weight_decay and finetune.clip_grad must be >= 0"),
            (0.0 <= self.dropout < 1.0, "finetune.dropout must be in [0, 1)"),
        ])


# Used when neither --max-steps nor --time-budget is given: the main job must finish in minutes.
DEFAULT_TIME_BUDGET = 300.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, section by section (schedules as the strings they were written as)."""
        return {name: section_dict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: Any, *, allow_derived: bool = False) -> "Config":
        """Build a config from nested mappings; presets first, then fields; strict about keys and types.
        `allow_derived`: a config a run saved. One saved before model.arch existed is a BERT's."""
        if allow_derived and isinstance(d, dict) and isinstance(d.get("model"), dict) and "arch" not in d["model"]:
            d = {**d, "model": {"arch": "bert", **d["model"]}}
        cfg = cls()
        cfg.update(d, allow_derived=allow_derived)
        return cfg

    def update(self, d: Any, *, allow_derived: bool = False, source: str = "config") -> None:
        if not isinstance(d, dict):
            raise UserError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(d).__name__}")
        for section, values in d.items():
            if section not in SECTIONS:
                raise UserError(f"{source}: unknown section {section!r}; sections are: {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise UserError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
            _update_section(getattr(self, section), section, values, allow_derived, source)

    def validate(self) -> None:
        """Cross-field checks; raises UserError naming the offending field."""
        m, d, k, t = self.model, self.data, self.mask, self.train
        checks = [
            (m.num_layers >= 1, "model.num_layers must be >= 1"),
            (m.hidden_size >= 1 and m.num_heads >= 1 and m.hidden_size % m.num_heads == 0,
             f"model.hidden_size ({m.hidden_size}) must be a positive multiple of model.num_heads ({m.num_heads})"),
            (m.intermediate_size >= 1, "model.intermediate_size must be >= 1"),
            (m.qk_init_std is None or m.qk_init_std > 0, "model.qk_init_std must be > 0"),
            (m.type_vocab_size >= 1, "model.type_vocab_size must be >= 1"),
            (m.init_std > 0 and math.isfinite(m.init_std), "model.init_std must be a positive number"),
            (m.layer_norm_eps is not None and m.layer_norm_eps > 0, "model.layer_norm_eps must be > 0"),
            (m.max_position is not None and m.max_position >= 8, "model.max_position must be >= 8"),
            (m.arch in ("bert", "modernbert"), f"model.arch must be 'bert' or 'modernbert', not {m.arch!r}"),
            (m.local_attention >= 2 and m.local_attention % 2 == 0, "model.local_attention must be an even number >= 2"),
            (m.global_every >= 1, "model.global_every must be >= 1"),
            (m.global_rope_theta > 1 and m.local_rope_theta > 1, "model rope thetas must be > 1"),
            (m.arch == "bert" or (m.hidden_size // m.num_heads) % 2 == 0, "modernbert: the head width (hidden / heads) must be even (rotary pairs)"),
            (t.short_rope_theta is None or (m.arch == "modernbert" and t.seq_len_schedule is not None and t.short_rope_theta > 1),
             "train.short_rope_theta needs --arch modernbert and a --seq-len-schedule, and must be > 1"),
            (m.arch == "bert" or t.objective == "mlm", f"train.objective {t.objective}: ModernBERT has no pooler or "
                                                       "next-sentence head; add --arch bert for sentence-pair objectives"),
            (m.arch == "bert" or (m.qk_init_std is None and m.position_init == "normal"),
             "model.qk_init_std and model.position_init are BERT's (ModernBERT has no position table and inits its "
             "own way); add --arch bert"),
            (0.0 <= m.hidden_dropout < 1 and 0.0 <= m.attention_dropout < 1, "dropout must be in [0, 1)"),
            (8 <= d.seq_len <= m.max_position,
             f"data.seq_len ({d.seq_len}) must be between 8 and model.max_position ({m.max_position})"),
            (0.0 < d.valid_fraction < 1.0, "data.valid_fraction must be in (0, 1)"),
            (d.vocab_size >= 16, "data.vocab_size must be >= 16"),
            (0.0 < k.mask_prob < 1.0, "mask.mask_prob must be in (0, 1)"),
            (0.0 < k.span_p <= 1.0 and k.span_max >= 1, "mask.span_p must be in (0, 1] and mask.span_max >= 1"),
            (k.mask_token_frac >= 0 and k.random_token_frac >= 0 and k.mask_token_frac + k.random_token_frac <= 1.0,
             "mask.mask_token_frac + mask.random_token_frac must be in [0, 1], each >= 0"),
            (t.batch_size >= 1 and t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0,
             f"train.batch_size ({t.batch_size}) must be a positive multiple of train.grad_accum ({t.grad_accum})"),
            (t.lr > 0 and math.isfinite(t.lr), "train.lr must be a positive number"),
            (0.0 <= t.adam_beta1 < 1.0 and 0.0 <= t.adam_beta2 < 1.0, "train.adam_beta1 and train.adam_beta2 must be in [0, 1)"),
            (t.adam_eps > 0, "train.adam_eps must be > 0"),
            (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
            (t.seed >= 0 and t.eval_seed >= 0, "train.seed and train.eval_seed must be >= 0"),
            (0.0 <= t.warmup_frac < 1.0, "train.warmup_frac must be in [0, 1)"),
            (0.0 <= t.min_lr_frac <= 1.0, "train.min_lr_frac must be in [0, 1]"),
            (0.0 < t.decay_frac <= 1.0 - t.warmup_frac, "train.decay_frac must be in (0, 1 - warmup_frac]"),
            (t.eval_seconds >= 0, "train.eval_seconds must be >= 0"),
            (t.clip_grad >= 0, "train.clip_grad must be >= 0"),
            (t.max_steps is None or t.max_steps >= 1, "train.max_steps must be >= 1"),
            (t.time_budget is None or t.time_budget > 0, "train.time_budget must be > 0 seconds"),
            (t.log_every >= 1, "train.log_every must be >= 1"),
            (t.eval_every >= 0, "train.eval_every must be >= 0"),
            (t.eval_sequences >= 1, "train.eval_sequences must be >= 1"),
            (t.checkpoint_every >= 0 and t.checkpoint_minutes >= 0, "checkpoint intervals must be >= 0"),
            (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
            (t.max_nonfinite >= 1, "train.max_nonfinite must be >= 1"),
            (t.threads is None or t.threads >= 1, "train.threads must be >= 1"),
        ]
        _require(checks)
        phases = self.seq_len_phases()
        if max(length for length, _ in phases) > m.max_position:
            raise UserError(f"train.seq_len_schedule reaches {max(length for length, _ in phases)} tokens, more than "
                            f"model.max_position ({m.max_position})")

    def rope_theta_at(self, phase: int) -> float:
        """ModernBERT's global rotary base in length phase `phase`: --short-rope-theta before the last phase."""
        t = self.train
        last = len(self.seq_len_phases()) - 1
        return t.short_rope_theta if t.short_rope_theta is not None and phase < last else self.model.global_rope_theta

    def seq_len_phases(self) -> list[tuple[int, float]]:
        """The sequence-length schedule as (length, end of phase in [0, 1]) pairs; one phase without one."""
        return seq_len_phases(self.train.seq_len_schedule, self.data.seq_len)

    def resume_changes(self, new: "Config") -> dict[str, list[str]]:
        """What resuming this (saved) config as `new` changes, by resume policy (see `_f`):
        {'free': [...], 'fixed': [...], 'never': [...]}, each entry 'section.field: old -> new'."""
        out: dict[str, list[str]] = {"free": [], "fixed": [], "never": []}
        for section in SECTIONS:
            for f in dataclasses.fields(getattr(self, section)):
                a, b = getattr(getattr(self, section), f.name), getattr(getattr(new, section), f.name)
                if f.metadata["resume"] != "ignore" and a != b:
                    out[f.metadata["resume"]].append(f"{section}.{f.name}: {_plain(a)!r} -> {_plain(b)!r}")
        return out

    def resolved(self) -> "Config":
        """A copy with run-time defaults applied (the time budget of the default run)."""
        cfg = Config.from_dict(self.to_dict(), allow_derived=True)
        if cfg.train.max_steps is None and cfg.train.time_budget is None:
            cfg.train.time_budget = DEFAULT_TIME_BUDGET
        cfg.validate()
        return cfg


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "mask": MaskConfig, "train": TrainConfig}


def _plain(v: Any) -> Any:
    """A field value as plain JSON (parsed values as the strings they were written as)."""
    return str(v) if isinstance(v, (SeqLenSchedule, BatchRamp)) else list(v) if isinstance(v, list) else v


def section_dict(obj: Any) -> dict[str, Any]:
    """A config section as plain JSON values."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _require(checks: list[tuple[bool, str]]) -> None:
    """Raise a UserError with the message of the first failed check."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _update_section(obj: Any, section: str, values: dict, allow_derived: bool, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    # The architecture first (a preset's shape depends on it), then the preset, then explicit fields.
    if "arch" in values and "arch" in fields:
        arch = _check_type(values["arch"], str, f"{section}.arch", source)
        if arch not in ("bert", "modernbert"):
            raise UserError(f"{source}: {section}.arch must be 'bert' or 'modernbert', not {arch!r}")
        if str(values.get("preset")) in MODERNBERT_PRESETS and arch != "modernbert":
            raise UserError(f"{source}: preset {values['preset']!r} is a ModernBERT; it cannot be {section}.arch {arch!r}")
        obj.switch_arch(arch)
    if values.get("preset") is not None and hasattr(obj, "apply_preset"):
        obj.apply_preset(_check_type(values["preset"], str, f"{section}.preset", source))
    for key, value in values.items():
        if key not in fields:
            close = [n for n in fields if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"{source}: unknown key {section}.{key}{hint}")
        if fields[key].metadata.get("derived") and not allow_derived:
            raise UserError(f"{source}: {section}.{key} is {fields[key].metadata['help']}; it cannot be set")
        if key == "preset":
            continue
        setattr(obj, key, _check_type(value, hints[key], f"{section}.{key}", source))


def _check_type(value: Any, tp: Any, name: str, source: str) -> Any:
    """Return `value` if it has type `tp` (ints accepted for floats); raise a UserError otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if value == "" and type(None) in args and set(args) & {SeqLenSchedule, BatchRamp}:
            return None  # an empty schedule is no schedule
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], name, source)
    if tp in (SeqLenSchedule, BatchRamp):  # written as a string, kept parsed
        if isinstance(value, tp):
            return value
        if not isinstance(value, str):
            raise UserError(f"{source}: {name} must be a string, got {type(value).__name__} {value!r}")
        return tp.parse(value)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{source}: {name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):  # one path given where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{source}: {name} must be a list, got {type(value).__name__}")
        return [_check_type(v, args[0], name, source) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise UserError(f"{source}: {name} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config_file(path: str | Path) -> dict:
    """Read a YAML, TOML or JSON mapping (not yet validated)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte {e.start})") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif p.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"{p}: config files must end in .yaml, .yml, .toml or .json")
    except UserError:
        raise
    except Exception as e:  # parser errors carry line numbers; keep them on one line
        raise UserError(f"{p}: cannot parse: {' '.join(str(e).split())}") from None
    return data if data is not None else {}


def cli_fields(sections: dict[str, type] | None = None) -> list[tuple[str, dataclasses.Field, Any]]:
    """(section, field, type) for every field exposed as a CLI flag."""
    out = []
    for section, cls in (sections or SECTIONS).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                out.append((section, f, hints[f.name]))
    return out


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def seq_len_phases(schedule: SeqLenSchedule | None, final: int) -> list[tuple[int, float]]:
    """The phases of `schedule` (one phase at `final` without one); the last phase must be at `final`
    (data.seq_len), the length the model is evaluated at."""
    if not schedule:
        return [(final, 1.0)]
    if isinstance(schedule, str):  # set on a Config object directly, not yet through from_dict
        schedule = SeqLenSchedule.parse(schedule)
    if schedule.phases[-1][0] != final:
        raise UserError(f"train.seq_len_schedule {schedule.spec!r}: the last phase is {schedule.phases[-1][0]} tokens; "
                        f"it must be --seq-len ({final})")
    return list(schedule.phases)


def parse_seq_len_schedule(spec: str | None, final: int) -> list[tuple[int, float]]:
    """'64:0.9,128:0.1' -> [(64, 0.9), (128, 1.0)] for a run at `final` tokens (see SeqLenSchedule)."""
    return seq_len_phases(SeqLenSchedule.parse(spec) if spec else None, final)
