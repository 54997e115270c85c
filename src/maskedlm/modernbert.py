"""The ModernBERT encoder with its MLM head, in one file, read top to bottom.

Shapes: B batch, T sequence length, H hidden size, nh heads, hd = H / nh, I GeGLU width, V vocabulary.

The architecture is ModernBERT's (Warner et al. 2024): token embeddings and a LayerNorm (no position table);
pre-LN blocks (the first block reuses the embeddings' norm) with one fused query/key/value projection,
rotary positions on queries and keys, and a GeGLU feed-forward; every `global_every`-th block (from the
first) attends over the whole sequence, the others within a sliding window of `local_attention` tokens;
a final LayerNorm; the MLM head (dense -> GELU -> LayerNorm -> decoder tied to the embeddings, plus a bias).
No linear or LayerNorm has a bias except the decoder's. Every parameter corresponds to exactly one of
`transformers`' `ModernBertForMaskedLM` (the map is in `hf.py`), so a trained model loads there with no custom
code, and a downloaded ModernBERT loads here.

The module and attribute names mirror `model.py` (`bert.embeddings.word`, `bert.layers`, `mlm.transform`),
so the training step, the sparse fused MLM loss, FSDP, fill-mask and evaluation treat both encoders alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, ModelConfig
from .model import BertForPreTraining, BertForSequenceClassification, Output, attention, sparse_mlm_loss
from .masking import IGNORE_INDEX


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.word(input_ids)))  # (B, T, H); positions enter as rotations


def rotary(T: int, hd: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (T, hd/2) fp32: position t turns feature pair (i, i + hd/2) by t / theta^(2i/hd)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)  # (hd/2,)
    angle = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv_freq  # (T, hd/2)
    return angle.cos(), angle.sin()


def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int, out: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (i, i + hd/2) of x (..., T, hd) by +-angle into `out` (same shape, any strides):
    out1 = x1 cos - sign x2 sin, out2 = x2 cos + sign x1 sin. All in x's dtype (products accumulate in fp32
    inside each kernel), as transformers computes it."""
    h = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`turn` by +angle in plain differentiable ops, for torch.compile (which fuses them into one kernel)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryQKV(torch.autograd.Function):
    """The fused projection's output (B, T, 3H) -> queries and keys rotated by their positions, and values: each
    (B, nh, T, hd), contiguous in that order (the attention's matmuls then need no copies).

    One autograd node with its own backward (the rotation's gradient is the opposite turn, written straight
    into the projection's gradient): through eager autograd, an fp32 copy, a cat for the half swap, the
    products and the layout changes cost ~10 passes over each tensor, forward and backward."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int):
        B, T, H3 = qkv.shape
        x = qkv.view(B, T, 3, num_heads, H3 // 3 // num_heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hd), a view
        q, k = (turn(x[i], cos, sin, 1, torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)) for i in (0, 1))
        ctx.save_for_backward(cos, sin)
        return q, k, x[2].contiguous()

    @staticmethod
    def backward(ctx, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor):
        cos, sin = ctx.saved_tensors
        B, nh, T, hd = gv.shape
        g = gv.new_empty(B, T, 3, nh, hd)
        gx = g.permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hd), a view of g
        turn(gq, cos, sin, -1, gx[0])
        turn(gk, cos, sin, -1, gx[1])
        gx[2].copy_(gv)
        return g.view(B, T, 3 * nh * hd), None, None, None


class GeGLU(torch.autograd.Function):
    """(B, T, 2I) -> GELU(first half) * second half, (B, T, I); exact GELU, as transformers' ModernBERT.

    Its own backward writes both halves' gradients straight into one (B, T, 2I) tensor: through autograd, the
    three products and the cat that joins the halves are each a pass over memory (at seq 128 the cat alone took
    2 ms a layer) - and autograd kept GELU's output too, where this keeps only the input."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        a, gate = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.gelu(a).mul_(gate)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        a, gate = h.chunk(2, dim=-1)
        gh = torch.empty_like(h)
        ga, ggate = gh.chunk(2, dim=-1)  # views of gh
        torch.mul(g, gate, out=ga)
        torch.ops.aten.gelu_backward.grad_input(ga, a, approximate="none", grad_input=ga)  # d/da: GELU'(a) g gate
        torch._C._nn.gelu(a, out=ggate).mul_(g)  # d/dgate: GELU(a) g
        return gh


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int):
    """(B, T, 3H) -> rotated queries and keys, values: 3 x (B, nh, T, hd). Under torch.compile the plain ops,
    which the compiler fuses (it cannot see into an autograd Function: a graph break at each)."""
    if not torch.compiler.is_compiling():
        return RotaryQKV.apply(qkv, cos, sin, num_heads)
    B, T, _ = qkv.shape
    q, k, v = qkv.view(B, T, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return rotated(q, cos, sin), rotated(k, cos, sin), v


def geglu(h: torch.Tensor) -> torch.Tensor:
    """(B, T, 2I) -> (B, T, I): GeGLU, or under torch.compile its plain ops (as rotary_qkv)."""
    if not torch.compiler.is_compiling():
        return GeGLU.apply(h)
    a, gate = h.chunk(2, dim=-1)
    return F.gelu(a) * gate


# Local layers run in blocks (`windowed`) once T is this many half-windows long (below, the band-masked full
# attention: 3 blocks of keys per query save little over T keys, and the blocks cost copies).
WINDOWED_FROM = 4


@dataclass
class Window:
    """A local layer's attention when the sequence is long enough to compute it in blocks (`windowed`):
    queries see keys at most `half` positions away, where `keep` (None, a (B, 1, 1, T) key mask or a
    (B, 1, T, T) per-query document mask) allows."""

    half: int
    keep: torch.Tensor | None


def windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: Window, p: float) -> torch.Tensor:
    """Sliding-window attention without the (T, T) scores: the queries in blocks of c = `half` tokens, each
    block against the keys of its own block and the blocks on either side (3c keys, which hold every key
    within `half` of its queries). T * 3c scores instead of T * T: at T = 1024 and a 128-token window, 5.3x
    fewer. The same function as the band-masked full attention (`Encoder.masks`), to rounding; a query
    always sees itself (a padding query has no other key). (B, nh, T, hd) in and out."""
    B, nh, T, hd = q.shape
    c = w.half
    n = -(-T // c)  # blocks
    pad = n * c - T
    dev = q.device

    def blocks(x: torch.Tensor, edge: int) -> torch.Tensor:  # (B, nh, T, hd) -> (B, nh, n + 2*edge, c, hd)
        return F.pad(x, (0, 0, edge * c, pad + edge * c)).view(B, nh, n + 2 * edge, c, hd)

    def neighbourhoods(x: torch.Tensor) -> torch.Tensor:  # (B, nh, T, hd) -> (B * n, nh, 3c, hd)
        xb = blocks(x, 1)
        x3 = torch.cat((xb[:, :, :-2], xb[:, :, 1:-1], xb[:, :, 2:]), dim=3)  # (B, nh, n, 3c, hd)
        return x3.transpose(1, 2).reshape(B * n, nh, 3 * c, hd)

    qb = blocks(q, 0).transpose(1, 2).reshape(B * n, nh, c, hd)
    qpos = torch.arange(n * c, device=dev).view(n, c)  # (n, c)
    kpos = (torch.arange(n, device=dev)[:, None] - 1) * c + torch.arange(3 * c, device=dev)  # (n, 3c)
    rel = qpos[:, :, None] - kpos[:, None, :]  # (n, c, 3c)
    allowed = (rel.abs() <= w.half) & (kpos[:, None, :] >= 0) & (kpos[:, None, :] < T)  # (n, c, 3c)
    if w.keep is not None:
        col = kpos + c  # (n, 3c): a key's column in the mask padded by c on the left (and pad + c on the right)
        if w.keep.shape[2] == 1:  # (B, 1, 1, T): keys only
            keys = F.pad(w.keep[:, 0, 0], (c, pad + c))  # (B, T + pad + 2c)
            allowed = allowed & keys[:, col][:, :, None, :]  # (B, n, c, 3c)
        else:  # (B, 1, T, T): each query its own keys (documents)
            rows = F.pad(w.keep[:, 0], (c, pad + c, 0, pad))  # (B, T + pad, T + pad + 2c)
            rows = rows.view(B, n, c, -1)
            allowed = allowed & rows.gather(3, col[None, :, None, :].expand(B, n, c, 3 * c))
    allowed = allowed | (rel == 0)
    mask = allowed.reshape(-1, 1, c, 3 * c)  # (B * n or n, 1, c, 3c), over the heads
    if mask.shape[0] != B * n:
        mask = mask.repeat(B, 1, 1, 1)
    y = attention(qb, neighbourhoods(k), neighbourhoods(v), mask, p)  # (B * n, nh, c, hd)
    return y.view(B, n, nh, c, hd).transpose(1, 2).reshape(B, nh, n * c, hd)[:, :, :T]


class Block(nn.Module):
    """A pre-LN block: x + attention(norm(x)), then x + GeGLU(norm(x))."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.num_heads = cfg.num_heads
        self.is_global = index % cfg.global_every == 0
        # The first block's input is the embeddings' LayerNorm output already (ModernBERT's layout).
        self.attn_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps, bias=False) if index > 0 else nn.Identity()
        self.qkv = nn.Linear(H, 3 * H, bias=False)  # rows: all heads' queries, then keys, then values
        self.out = nn.Linear(H, H, bias=False)
        self.mlp_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps, bias=False)
        self.mlp_in = nn.Linear(H, 2 * I, bias=False)  # rows: the GELU input, then the gate
        self.mlp_out = nn.Linear(I, H, bias=False)
        self.attention_dropout, self.dropout = cfg.attention_dropout, nn.Dropout(cfg.hidden_dropout)

    def attention(self, x: torch.Tensor, mask: torch.Tensor | Window | None, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = rotary_qkv(self.qkv(x), cos, sin, self.num_heads)  # 3 x (B, nh, T, hd)
        p = self.attention_dropout if self.training else 0.0
        y = windowed(q, k, v, mask, p) if isinstance(mask, Window) else attention(q, k, v, mask, p)
        return F.dropout(self.out(y.transpose(1, 2).reshape(B, T, H)), p, self.training)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | Window | None, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), mask, cos, sin)
        return x + self.mlp_out(self.dropout(geglu(self.mlp_in(self.mlp_norm(x)))))


class Encoder(nn.Module):
    """Embeddings, blocks and the final norm: transformers' `ModernBertModel`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False)
        # The global layers' rotary base: the config's, or a schedule's during short phases (set_global_theta).
        self.global_theta = cfg.global_rope_theta

    def masks(self, attention_mask: torch.Tensor | None, T: int, device: torch.device):
        """(global, local) boolean masks, True where a query may attend a key, or None for "everything"; the
        local one is a `Window` (computed in blocks) when T is at least twice the window.

        attention_mask: None, (B, T) with 1 for tokens and 0 for padding, or (B, T, T) per query (document
        masking of packed sequences). Local layers also require |query - key| <= local_attention / 2."""
        if attention_mask is None:
            full = None
        elif attention_mask.dim() == 2:
            full = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        else:
            full = attention_mask.bool()[:, None]  # (B, 1, T, T)
        half = self.config.local_attention // 2
        if T - 1 <= half:  # the window covers the whole sequence: local layers are global ones
            return full, full
        if T >= WINDOWED_FROM * half and half >= 1:  # blocks of `half`: 3 * half keys per query instead of T
            return full, Window(half, full)
        pos = torch.arange(T, device=device)
        band = (pos[:, None] - pos[None, :]).abs() <= half  # (T, T)
        if full is None:
            return None, band
        # A padding query whose window holds only padding would have no key at all (a softmax over nothing:
        # NaN, which the zero attention weights of later layers do not stop). Each query may always see
        # itself; a real token's result is unchanged (it never sees padding).
        return full, (full & band) | torch.eye(T, dtype=torch.bool, device=device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T); attention_mask as in `masks`; token_type_ids are ignored: ModernBERT has no
        segment embeddings (a sentence pair is told apart by its [SEP] alone). Returns (B, T, H)."""
        cfg, T = self.config, input_ids.shape[1]
        hd = cfg.hidden_size // cfg.num_heads
        full, local = self.masks(attention_mask, T, input_ids.device)
        x = self.embeddings(input_ids)
        # cos and sin in the activations' dtype (as transformers does): mixed dtypes would cost a cast and a copy
        rot = {True: [t.to(x.dtype) for t in rotary(T, hd, self.global_theta, input_ids.device)],
               False: [t.to(x.dtype) for t in rotary(T, hd, cfg.local_rope_theta, input_ids.device)]}
        for layer in self.layers:
            x = layer(x, full if layer.is_global else local, *rot[layer.is_global])
        return self.final_norm(x)


class Head(nn.Module):
    """dense -> GELU -> LayerNorm (transformers' ModernBertPredictionHead), before the decoder or a classifier."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False)

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h)))


class MLMHead(Head):
    """Head -> decoder. The decoder weight is the word embedding matrix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(h), decoder_weight, self.bias)


class ModernBertForPreTraining(nn.Module):
    """ModernBERT with its MLM head; the same interface as `BertForPreTraining` (no NSP head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "modernbert":
            raise ValueError(f"ModernBertForPreTraining needs a ModelConfig with arch='modernbert', not {cfg.arch!r}")
        self.config = cfg
        self.bert = Encoder(cfg)
        self.mlm = MLMHead(cfg)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # ModernBERT's: truncated normals (cut at 2 std); the projections that write into the residual
        # stream (attention output, feed-forward output, head dense) at std / sqrt(2 * layers).
        std, out_std = self.config.init_std, self.config.init_std / math.sqrt(2.0 * self.config.num_layers)

        def normal(w: torch.Tensor, s: float) -> None:
            nn.init.trunc_normal_(w, std=s, a=-2 * s, b=2 * s)

        normal(self.bert.embeddings.word.weight, std)
        for layer in self.bert.layers:
            normal(layer.qkv.weight, std)
            normal(layer.mlp_in.weight, std)
            normal(layer.out.weight, out_std)
            normal(layer.mlp_out.weight, out_std)
        normal(self.mlm.dense.weight, out_std)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)

    init_mlm_bias = BertForPreTraining.init_mlm_bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                nsp: bool = False) -> Output:
        """input_ids: (B, T). labels: (B, T) with -100 where nothing is predicted, or None for dense logits."""
        if nsp:
            raise ValueError("ModernBERT has no next-sentence head")
        hidden = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        if labels is None:
            return Output(hidden, self.mlm(hidden, self.bert.embeddings.word.weight))
        loss_sum, correct = sparse_mlm_loss(hidden, labels, self.mlm, self.bert.embeddings.word.weight)
        return Output(hidden, None, loss_sum, (labels != IGNORE_INDEX).sum(), correct)

    def pair_head_parameters(self) -> list[nn.Parameter]:
        return []

    def set_global_theta(self, theta: float) -> None:
        """Rotary base of the global layers from now on (no parameter changes: rotary has none)."""
        self.bert.global_theta = theta

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.bert.embeddings.word.weight.numel() if non_embedding else n


class ModernBertForSequenceClassification(nn.Module):
    """The encoder, the [CLS] position through a Head, dropout and a linear classifier (transformers'
    `ModernBertForSequenceClassification` with classifier_pooling 'cls', parameter for parameter)."""

    def __init__(self, cfg: ModelConfig, num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.config, self.num_labels = cfg, num_labels
        self.bert = Encoder(cfg)
        self.head = Head(cfg)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        s = cfg.hidden_size ** -0.5  # ModernBERT's classifier initialisation
        nn.init.trunc_normal_(self.classifier.weight, std=s, a=-2 * s, b=2 * s)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, num_labels) logits."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(self.head.transform(hidden[:, 0])))


def use_phase(model: nn.Module, cfg: Config, phase: int) -> None:
    """Make `model` compute as in length phase `phase` of `cfg`'s run: under --short-rope-theta, ModernBERT's
    global rotary base of that phase; otherwise nothing changes with the phase."""
    if cfg.train.short_rope_theta is not None:
        model.set_global_theta(cfg.rope_theta_at(phase))


def build_model(cfg: ModelConfig) -> BertForPreTraining | ModernBertForPreTraining:
    """The pre-training model that `cfg.arch` names, freshly initialised."""
    return ModernBertForPreTraining(cfg) if cfg.arch == "modernbert" else BertForPreTraining(cfg)


def build_classifier(cfg: ModelConfig, num_labels: int, dropout: float = 0.1) -> nn.Module:
    """A sequence classifier for `cfg.arch`, freshly initialised."""
    if cfg.arch == "modernbert":
        return ModernBertForSequenceClassification(cfg, num_labels, dropout)
    return BertForSequenceClassification(cfg, num_labels, dropout)


def classifier_from(base: nn.Module, num_labels: int, dropout: float = 0.1) -> nn.Module:
    """A classifier starting from a pre-trained model's encoder. ModernBERT's pooling head starts from the MLM
    head's dense and norm, as transformers' from_pretrained of an MLM checkpoint does (they share names)."""
    model = build_classifier(base.config, num_labels, dropout)
    model.bert.load_state_dict(base.bert.state_dict())
    if base.config.arch == "modernbert":
        model.head.load_state_dict({k: v for k, v in base.mlm.state_dict().items() if k != "bias"})
    return model
