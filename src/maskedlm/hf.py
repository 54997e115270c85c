"""Hugging Face BERT interop: the explicit map between our parameter names and `BertForPreTraining`'s.

Every one of our parameters corresponds to exactly one of theirs; theirs additionally has
`cls.predictions.decoder.weight` (tied to the word embeddings) and `cls.predictions.decoder.bias` (tied to
`cls.predictions.bias`), which we do not store twice.
"""

from __future__ import annotations

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
_HEADS = {
    "bert.pooler.weight": "bert.pooler.dense.weight",
    "bert.pooler.bias": "bert.pooler.dense.bias",
    "mlm.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm.bias": "cls.predictions.bias",
    "nsp.weight": "cls.seq_relationship.weight",
    "nsp.bias": "cls.seq_relationship.bias",
}


def key_map(num_layers: int) -> dict[str, str]:
    """Our state-dict key -> Hugging Face `BertForPreTraining` state-dict key."""
    out = dict(_EMBEDDINGS)
    for i in range(num_layers):
        for ours, theirs in _LAYER.items():
            for kind in ("weight", "bias"):
                out[f"bert.layers.{i}.{ours}.{kind}"] = f"bert.encoder.layer.{i}.{theirs}.{kind}"
    out.update(_HEADS)
    return out
