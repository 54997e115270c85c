"""maskedlm: pre-train BERT-style masked language models, from raw text to a checkpoint.

The public API:
    mask_tokens        BERT's 15% / 80-10-10 masking of a batch (pure, generator-driven)
    BertForPreTraining the model; ModelConfig its shape
    Config             the typed run configuration (model, data, mask, train)
    pretrain           run pre-training from a Config
    load               `model, tokenizer = load(RUN)`
    fill_mask          top-k predictions for [MASK] tokens
    Tokenizer          WordPiece / character-level / file tokenizers
"""

__version__ = "0.1.0"

from .checkpoint import load
from .config import Config, DataConfig, MaskConfig, ModelConfig, TrainConfig
from .errors import UserError
from .fill_mask import fill_mask
from .masking import mask_tokens
from .model import BertForPreTraining
from .tokenizer import Tokenizer
from .train import pretrain

__all__ = ["BertForPreTraining", "Config", "DataConfig", "MaskConfig", "ModelConfig", "TrainConfig", "Tokenizer",
           "UserError", "fill_mask", "load", "mask_tokens", "pretrain", "__version__"]
