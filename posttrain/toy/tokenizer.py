"""A small byte-level BPE tokenizer trained locally, with the Gemma control tokens.

Real Gemma tokenizers cannot be downloaded here, and tests need one that behaves like a real
tokenizer (merges, byte fallback, special tokens). Digits are split one by one so that tiny
models can learn arithmetic digit by digit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from posttrain.chat import BOS, CONTROL_TOKENS, END_OF_TURN, EOS, GEMMA_CHAT_TEMPLATE, PAD, UNK


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 768):
    """Train a byte-level BPE on `corpus` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CONTROL_TOKENS),  # ids 0..5: <pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn>
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[t for t in CONTROL_TOKENS if t not in (BOS, EOS, PAD, UNK)],
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    return fast


def build_toy_tokenizer(out_dir: str | Path, seed: int = 0, vocab_size: int = 768):
    """Train the toy-world tokenizer on text from every toy task and save it to `out_dir`."""
    from posttrain.toy.tasks import tokenizer_corpus

    tok = train_tokenizer(tokenizer_corpus(seed), vocab_size=vocab_size)
    tok.save_pretrained(str(out_dir))
    return tok


__all__ = ["train_tokenizer", "build_toy_tokenizer", "END_OF_TURN"]
