"""maskedlm: pre-train BERT-style masked language models, from raw text to a checkpoint.

The public API:
    mask_tokens        BERT's 15% / 80-10-10 masking of a batch (pure, generator-driven)
    BertForPreTraining the model; ModelConfig its shape
    Config             the typed run configuration (model, data, mask, train)
    pretrain           run pre-training from a Config
    load               `model, tokenizer = load(PATH)` (a run folder, a checkpoint, a Hugging Face BERT
                       folder or a fine-tuned classifier)
    fill_mask          top-k predictions for [MASK] tokens
    Tokenizer          WordPiece / character-level / file tokenizers

Names are imported on first use, so that `maskedlm.data` (data preparation, also in worker processes)
does not pay for importing PyTorch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load": "loading", "Config": "config", "DataConfig": "config", "MaskConfig": "config",
    "ModelConfig": "config", "TrainConfig": "config", "UserError": "errors", "fill_mask": "fill",
    "mask_tokens": "masking", "BertForPreTraining": "model", "Tokenizer": "tokenizer", "pretrain": "train",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maskedlm' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
