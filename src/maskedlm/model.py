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


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query, self.key, self.value = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        self.out = nn.Linear(H, H)
        self.dropout_p = cfg.attention_dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape
        # (B, T, H) -> (B, nh, T, hd)
        q, k, v = (proj(x).view(B, T, self.num_heads, -1).transpose(1, 2) for proj in (self.query, self.key, self.value))
        # attn_mask: (B, 1, 1, T) bool, True where the key is a real token; None for packed batches,
        # which lets SDPA pick the flash / memory-efficient kernels on CUDA.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, H))


class Block(nn.Module):
    """A post-LN transformer block, as in BERT."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
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
        """input_ids: (B, T); attention_mask: (B, T), 1 for tokens and 0 for padding. Returns (B, T, H)."""
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): broadcast over heads and queries
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

    def forward(self, h: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits."""
        return F.linear(self.norm(F.gelu(self.dense(h))), decoder_weight, self.bias)


@dataclass
class Output:
    """What `BertForPreTraining.forward` returns.

    hidden_states: (B, T, H). logits: (B, T, V) without labels; with labels, (N, V) for the N predicted
    positions only, in row-major order. loss_sum: summed cross-entropy over predicted positions (divide by
    `num_predicted`; summing lets accumulation and data parallelism normalise by the global count).
    correct: how many predicted positions the argmax got right. nsp_logits: (B, 2) when asked for.
    """

    hidden_states: torch.Tensor
    logits: torch.Tensor
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
        self.config = cfg
        self.bert = Encoder(cfg)
        self.mlm = MLMHead(cfg)
        self.nsp = nn.Linear(cfg.hidden_size, 2)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm, zero padding embedding.
        std = self.config.init_std
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
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
        decoder = self.bert.embeddings.word.weight  # (V, H), tied
        if labels is None:
            return Output(hidden, self.mlm(hidden, decoder), nsp_logits=nsp_logits)
        # Sparse prediction: gather the predicted positions, run the head on those rows only.
        flat = labels.reshape(-1)  # (B*T,)
        keep = flat != IGNORE_INDEX
        targets = flat[keep]  # (N,)
        logits = self.mlm(hidden.reshape(-1, hidden.shape[-1])[keep], decoder)  # (N, V)
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = (logits.argmax(-1) == targets).sum()
        return Output(hidden, logits, loss_sum, keep.sum(), correct, nsp_logits)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            e = self.bert.embeddings
            n -= e.word.weight.numel() + e.position.weight.numel() + e.token_type.weight.numel()
        return n
