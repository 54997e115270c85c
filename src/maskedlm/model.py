"""The BERT encoder with its pre-training heads, in one file, read top to bottom.

Shapes: B batch, T sequence length, H hidden size, nh heads, hd = H / nh, V vocabulary, N predicted
positions in the batch.

The architecture is BERT's (Devlin et al. 2019): word + position + token-type embeddings and a LayerNorm;
post-LN transformer blocks (attention -> add -> LayerNorm, feed-forward with exact GELU -> add -> LayerNorm);
an MLM head (dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, plus a bias); a pooler
(tanh of a dense layer on [CLS]) feeding the next-sentence-prediction head. Every parameter corresponds to
exactly one parameter of Hugging Face's `BertForPreTraining` (the map is in `hf.py`).

The MLM head runs on the predicted positions only when labels are given: with 15% masking that skips 85%
of the vocabulary projection, the largest matrix product of a small model. The result equals the dense
computation (tested).

This is single-device code: parallelism and compilation are applied from outside, in `train.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .masking import IGNORE_INDEX

# Longest key sequence for which CPU bf16 attention uses explicit matmuls instead of SDPA (see attention()):
# beyond it, the softmax kept for the backward ((T, T) per head) outgrows what SDPA's kernels keep (O(T)).
MATMUL_ATTENTION_MAX_LEN = 4096
# Queries per chunk of the matmul attention: the scores of a chunk stay cache-sized (benchmarks/attention.py).
ATTENTION_QUERY_CHUNK = 128
# The MLM head's row count is padded to a multiple of this (see sparse_mlm_loss).
PREDICTION_BUCKET = 64


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.word(input_ids) + self.position(positions)  # (B, T, H)
        if token_type_ids is None:
            x = x + self.token_type.weight[0]  # segment 0 everywhere; skips a gather
        else:
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


def sinusoids(positions: int, width: int, std: float) -> torch.Tensor:
    """Vaswani et al.'s position table, (positions, width): sin at even, cos at odd features, frequencies
    1 / 10000^(2i/width); scaled to RMS `std`, the scale of a normal initialisation."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    angle = pos / 10000 ** (torch.arange(0, width, 2, dtype=torch.float64) / width)  # (P, width/2)
    table = torch.zeros(positions, width, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(angle), torch.cos(angle[:, : width // 2])
    return (table * std * 2**0.5).float()


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.num_heads = cfg.num_heads
        bias = cfg.linear_bias
        self.query, self.key, self.value = (nn.Linear(H, H, bias=bias) for _ in range(3))
        self.out = nn.Linear(H, H, bias=bias)
        self.dropout_p = cfg.attention_dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape
        # (B, T, H) -> (B, nh, T, hd)
        q, k, v = (proj(x).view(B, T, self.num_heads, -1).transpose(1, 2) for proj in (self.query, self.key, self.value))
        # attn_mask: (B, 1, 1, T) bool, True where the key is a real token, or (B, 1, T, T) per query (document
        # masking); None for packed batches,
        # which lets SDPA pick the flash / memory-efficient kernels on CUDA.
        dropout_p = self.dropout_p if self.training else 0.0
        return self.out(attention(q, k, v, attn_mask, dropout_p).transpose(1, 2).reshape(B, T, H))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over (..., nh, Tq, hd) x (..., nh, Tk, hd); attn_mask True where a query may
    attend a key. bf16 on a CPU: explicit matmuls (measured faster there); elsewhere SDPA."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[-2] <= MATMUL_ATTENTION_MAX_LEN:
        return _matmul_attention(q, k, v, attn_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                      dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with bf16 matmuls, in chunks of queries; (..., nh, T, hd) in and out.

    The same function as SDPA. On CPU it measured 2-4x faster than PyTorch's CPU SDPA kernels in bf16 (their
    flash backward and the math path's fp32 upcast are slow; BENCHMARKS.md). The scale is applied to q (half
    the size of the scores), and the softmax reads and writes bf16 while accumulating in fp32 inside the
    kernel, so no fp32 copy of the scores is made. Longer sequences go in chunks of ATTENTION_QUERY_CHUNK
    queries, whose scores stay cache-sized: forward + backward at 1,024 tokens took 37 ms in chunks of 128
    queries against 66 ms whole and 67 ms for SDPA, at 512 tokens 9 ms against 15 and 20
    (benchmarks/attention.py, BENCHMARKS.md).
    """
    Tq, c = q.shape[-2], ATTENTION_QUERY_CHUNK
    q, kt = q * q.shape[-1] ** -0.5, k.transpose(-1, -2)
    if c >= Tq:
        return _attend(q, kt, v, attn_mask, dropout_p)
    per_query = attn_mask is not None and attn_mask.shape[-2] > 1  # (..., Tq, Tk), not (..., 1, Tk)
    # q.split, not slices of q: the backward then writes each chunk's gradient into place once (a slice's
    # backward makes a zero-filled gradient the size of q for every chunk).
    return torch.cat([_attend(qc, kt, v, attn_mask[..., i * c:(i + 1) * c, :] if per_query else attn_mask, dropout_p)
                      for i, qc in enumerate(q.split(c, dim=-2))], dim=-2)


def _attend(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
            dropout_p: float) -> torch.Tensor:
    """q already scaled, kt = k transposed: (..., nh, Tq, hd) @ (..., nh, hd, Tk) -> scores (..., nh, Tq, Tk)."""
    scores = q @ kt
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return F.dropout(scores.softmax(-1), dropout_p) @ v


class Block(nn.Module):
    """A post-LN transformer block, as in BERT."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.linear_bias)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.linear_bias)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, attn_mask)))
        x = self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))
        return x


class Encoder(nn.Module):
    """Embeddings, blocks and the pooler: BERT without heads (Hugging Face's `BertModel`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T); attention_mask: (B, T), 1 for tokens and 0 for padding, or (B, T, T), True
        where a query may attend a key (see masking.document_attention_mask). Returns (B, T, H)."""
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): broadcast over heads and queries
        elif attention_mask is not None:
            mask = attention_mask.bool()[:, None]  # (B, 1, T, T): broadcast over heads
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, H): tanh of a dense layer on the [CLS] position."""
        return torch.tanh(self.pooler(hidden[:, 0]))


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder. The decoder weight is the word embedding matrix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H): the part of the head before the decoder."""
        return self.norm(F.gelu(self.dense(h)))

    def forward(self, h: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits."""
        return F.linear(self.transform(h), decoder_weight, self.bias)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, t_i) and the number of rows whose argmax is t_i, in row chunks.

    Each chunk's logits are formed, reduced to loss and argmax, and turned into d(loss)/d(logits) = softmax
    - onehot while they are still in cache; only that gradient (in the compute dtype) is kept, and the two
    gradient products run once at the end. The loss is the last operation of the graph, so its gradient
    is known up to the incoming scalar, which backward applies. Versus logits -> float -> cross_entropy
    this saves most of the memory traffic over (N, V), the head's bottleneck on CPUs (BENCHMARKS.md).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int):
        N, V = h.shape[0], weight.shape[0]
        need_grad = any(ctx.needs_input_grad[:3])
        ignored = bool((targets == IGNORE_INDEX).any())  # rows that contribute nothing (padding)
        acc = torch.promote_types(h.dtype, torch.float32)  # the softmax runs in fp32 at least
        loss = torch.zeros((), dtype=acc, device=h.device)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        if need_grad:
            grad_logits = torch.empty(N, V, dtype=h.dtype, device=h.device)  # (N, V)
            grad_bias = torch.zeros(V, dtype=acc, device=h.device)
        for start in range(0, N, chunk):
            end = min(N, start + chunk)
            t = targets[start:end]
            valid = t != IGNORE_INDEX
            t = t.clamp(min=0)
            logits = torch.add(h[start:end] @ weight.t(), bias.to(acc))  # (c, V), fp32 (or fp64)
            top, argmax = logits.max(-1)
            correct += ((argmax == t) & valid).sum()
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            p = logits.sub_(top[:, None]).exp_()  # unnormalised softmax, in place
            z = p.sum(-1)
            row_loss = z.log() + top - target_logit
            loss += (row_loss * valid).sum() if ignored else row_loss.sum()
            if need_grad:
                p.div_(z[:, None])
                p[torch.arange(end - start, device=h.device), t] -= 1.0
                if ignored:
                    p.mul_(valid[:, None])
                grad_bias += p.sum(0)
                grad_logits[start:end] = p
        if need_grad:
            ctx.save_for_backward(grad_logits @ weight, grad_logits.t() @ h, grad_bias.to(bias.dtype))
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype),
                grad_b * grad_loss.to(grad_b.dtype), None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of logits h @ weight^T + bias against targets, and the count of correct argmaxes.

    h: (N, H); weight: (V, H); bias: (V,); targets: (N,), rows with -100 ignored. The matrix products run in the autocast dtype
    when autocast is on (the softmax always in fp32).
    """
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    # 64 rows per chunk on CPU (measured best for vocabularies of 8k and 30k: small enough to stay in cache,
    # large enough for efficient matrix products); one chunk on GPUs, where bandwidth makes chunking moot.
    chunk = 64 if dev == "cpu" else max(1, h.shape[0])
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h.to(dtype), weight.to(dtype), bias, targets, chunk)


def sparse_mlm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                    decoder_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed MLM cross-entropy over the positions where labels != -100, and how many the argmax got right.

    hidden: (B, T, H); labels: (B, T); head: has `transform` ((..., H) -> (..., H)) and a `bias` (V,);
    decoder_weight: (V, H), the word embeddings. Sparse prediction: gather the predicted positions and run the
    head on those rows only, with the decoder fused into the loss so the (N, V) logits are never stored (see
    linear_cross_entropy). N is rounded up to a multiple of PREDICTION_BUCKET with ignored rows: the head's
    matrix products then take one of a few shapes per run, and oneDNN / cuBLAS reuse their kernels (a new
    shape every step costs oneDNN a kernel compilation, ~10 ms on CPU). Shared by BERT and ModernBERT.
    """
    flat = labels.reshape(-1)  # (B*T,)
    idx = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
    pad = -idx.numel() % PREDICTION_BUCKET
    targets = F.pad(flat[idx], (0, pad), value=IGNORE_INDEX)  # (N + pad,)
    idx = F.pad(idx, (0, pad))  # padded rows read position 0; their targets are ignored
    h = head.transform(hidden.reshape(-1, hidden.shape[-1])[idx])  # (N + pad, H)
    return linear_cross_entropy(h, decoder_weight, head.bias, targets)


@dataclass
class Output:
    """What `BertForPreTraining.forward` returns.

    hidden_states: (B, T, H). logits: (B, T, V) without labels; None with labels (the loss is fused with
    the decoder and the logits are never stored). loss_sum: summed cross-entropy over predicted positions (divide by
    `num_predicted`; summing lets accumulation and data parallelism normalise by the global count).
    correct: how many predicted positions the argmax got right. nsp_logits: (B, 2) when asked for.
    """

    hidden_states: torch.Tensor
    logits: torch.Tensor | None
    loss_sum: torch.Tensor | None = None
    num_predicted: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor:
        """Mean masked-token loss of this batch."""
        return self.loss_sum / self.num_predicted.clamp(min=1)


class BertForPreTraining(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "bert":
            raise ValueError(f"BertForPreTraining needs a ModelConfig with arch='bert', not {cfg.arch!r} (see modernbert.build_model)")
        self.config = cfg
        self.bert = Encoder(cfg)
        self.mlm = MLMHead(cfg)
        self.nsp = nn.Linear(cfg.hidden_size, 2)
        self.apply(self._init_weights)
        if cfg.qk_init_std is not None:
            for layer in self.bert.layers:
                nn.init.normal_(layer.attn.query.weight, std=cfg.qk_init_std)
                nn.init.normal_(layer.attn.key.weight, std=cfg.qk_init_std)
        if cfg.position_init == "sinusoidal":
            with torch.no_grad():
                self.bert.embeddings.position.weight.copy_(sinusoids(cfg.max_position, cfg.hidden_size, cfg.init_std))

    @torch.no_grad()
    def init_mlm_bias(self, counts: torch.Tensor) -> None:
        """Set the MLM output bias to the log unigram frequencies of `counts` (V,) (add-one smoothed), so the
        untrained head predicts the unigram distribution instead of a uniform one."""
        counts = counts.double()
        self.mlm.bias.copy_(torch.log((counts + 1) / (counts.sum() + counts.numel())))

    def _init_weights(self, m: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm, zero padding embedding.
        std = self.config.init_std
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:  # None in the blocks under linear_bias=False
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                nsp: bool = False) -> Output:
        """input_ids: (B, T). labels: (B, T) with -100 where nothing is predicted, or None for dense logits."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        nsp_logits = self.nsp(self.bert.pool(hidden)) if nsp else None  # (B, 2)
        if labels is None:
            return Output(hidden, self.mlm(hidden, self.bert.embeddings.word.weight), nsp_logits=nsp_logits)
        loss_sum, correct = self.mlm_loss(hidden, labels)
        return Output(hidden, None, loss_sum, (labels != IGNORE_INDEX).sum(), correct, nsp_logits)

    def mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sparse_mlm_loss(hidden, labels, self.mlm, self.bert.embeddings.word.weight)

    def pair_head_parameters(self) -> list[nn.Parameter]:
        """The pooler and NSP head: trained only with a sentence-pair objective."""
        return [*self.bert.pooler.parameters(), *self.nsp.parameters()]

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            e = self.bert.embeddings
            n -= e.word.weight.numel() + e.position.weight.numel() + e.token_type.weight.numel()
        return n


class BertForSequenceClassification(nn.Module):
    """The encoder, its pooler, dropout and a linear classifier on the pooled [CLS] (Hugging Face's
    `BertForSequenceClassification`, parameter for parameter)."""

    def __init__(self, cfg: ModelConfig, num_labels: int, dropout: float = 0.1):
        super().__init__()
        if cfg.arch != "bert":
            raise ValueError(f"BertForSequenceClassification needs arch='bert', not {cfg.arch!r} (see modernbert.build_classifier)")
        self.config, self.num_labels = cfg, num_labels
        self.bert = Encoder(cfg)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=cfg.init_std)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, num_labels) logits."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(self.bert.pool(hidden)))
