"""BERT sequence classification (transformers) for text.

Three ways to get the encoder:

- ``pretrained: bert-base-uncased`` (a hub name) or ``pretrained: /path/to/folder``
  (a local checkpoint with ``config.json``, weights and tokenizer files);
- no ``pretrained``: a small BERT built from scratch with the sizes below, and a word
  vocabulary learnt from the training texts (or the tokenizer named by ``tokenizer``).

The tokenizer and the model's architecture are saved with every checkpoint, so a
checkpoint alone rebuilds the model offline.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from trainyard import DataInfo, ModelSpec, Processor, hookimpl

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORD = re.compile(r"\w+|[^\w\s]")


@dataclass
class BertParams:
    #: Hub name or local folder of a pretrained checkpoint; empty: build from scratch.
    pretrained: str = ""
    #: Hub name or local folder of a tokenizer for a from-scratch model; empty: learn a
    #: word vocabulary from the training texts.
    tokenizer: str = ""
    #: Tokens per text (longer texts are truncated).
    max_length: int = 64
    #: Sizes of a from-scratch model.
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 4000
    dropout: float = 0.1

    def __post_init__(self):
        if self.max_length < 4:
            raise ValueError("max_length must be at least 4")
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1")
        if self.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be above {len(SPECIAL_TOKENS)} (the special tokens)")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")


class TextProcessor(Processor):
    """Strings to ``input_ids`` and ``attention_mask`` with the model's tokenizer."""

    tokenizer = None

    def fit(self, inputs):
        from transformers import AutoConfig, AutoTokenizer, BertConfig

        p = self.params
        if p.pretrained or p.tokenizer:
            self.tokenizer = AutoTokenizer.from_pretrained(p.pretrained or p.tokenizer)
        else:
            self.tokenizer = _word_tokenizer(inputs, p.vocab_size)
        if p.pretrained:
            config = AutoConfig.from_pretrained(p.pretrained)
        else:
            config = BertConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=p.hidden_size,
                num_hidden_layers=p.num_layers,
                num_attention_heads=p.num_heads,
                intermediate_size=p.intermediate_size,
                max_position_embeddings=max(512, p.max_length),
                hidden_dropout_prob=p.dropout,
                attention_probs_dropout_prob=p.dropout,
            )
        config.num_labels = self.info.num_outputs
        config.id2label = dict(enumerate(self.info.classes)) or None
        self.state = {"model_config": config.to_dict()}

    def encode(self, inputs):
        if isinstance(inputs, str) or not all(isinstance(t, str) for t in inputs):
            raise ValueError("expected a list of strings")
        batch = self.tokenizer(
            list(inputs),
            padding="max_length",
            truncation=True,
            max_length=self.params.max_length,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def save(self, directory):
        super().save(directory)
        self.tokenizer.save_pretrained(str(Path(directory, "tokenizer")))

    def load(self, directory):
        from transformers import AutoTokenizer

        super().load(directory)
        self.tokenizer = AutoTokenizer.from_pretrained(str(Path(directory, "tokenizer")))


def _word_tokenizer(texts, vocab_size: int):
    """A BERT tokenizer whose vocabulary is the most frequent training words."""
    from transformers import BertTokenizer

    counts = Counter(w for t in texts for w in WORD.findall(t.lower()))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    vocab = SPECIAL_TOKENS + words[: max(0, vocab_size - len(SPECIAL_TOKENS))]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)

def build(params: BertParams, info: DataInfo, processor: TextProcessor):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config_dict = dict(processor.state["model_config"])
    model_type = config_dict.pop("model_type", "bert")
    config = AutoConfig.for_model(model_type, **config_dict)
    if params.pretrained and not processor.restored:
        inner = AutoModelForSequenceClassification.from_pretrained(
            params.pretrained, config=config, ignore_mismatched_sizes=True
        )
    else:  # weights come from our own checkpoint, or there are none to fetch
        inner = AutoModelForSequenceClassification.from_config(config)

    class SequenceClassifier(torch.nn.Module):
        """Returns the logits tensor, as the training loop expects."""

        def __init__(self):
            super().__init__()
            self.model = inner

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    return SequenceClassifier()


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name="bert",
            build=build,
            inputs=["text"],
            processor=TextProcessor,
            params=BertParams,
            description="BERT sequence classifier: hub name, local folder, or small from scratch",
        )
    )
