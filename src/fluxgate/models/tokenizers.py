"""Tokenizers built offline for the tiny profile: a word-level vocabulary made from a fixed word list.

Nothing is downloaded. The vocabulary is deterministic, so the same prompt always gives the same token ids,
and the tokenizer is a real `transformers.PreTrainedTokenizerFast` (padding, truncation, batch_decode and
chat templates behave as the pipelines expect).
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Enough distinct words to tokenize the fixture prompts; anything else maps to the unknown token.
_WORDS = (
    "a an the of and in on with at by for to from is are photo photograph portrait painting image picture "
    "cat dog fox bird horse tree forest city street river mountain lake sea ocean sky cloud sun moon star "
    "red orange yellow green blue purple white black gray golden silver bright dark soft warm cold "
    "small large tiny huge old young wooden glass stone metal neon light shadow night day morning evening "
    "close up wide shot detailed sharp blurry cinematic studio lighting background foreground style "
    "make change turn add remove keep same it into like more less very"
).split()


def word_level_tokenizer(
    special_tokens: list[str],
    *,
    unk_token: str,
    pad_token: str,
    model_max_length: int,
    lowercase: bool = True,
    padding_side: str = "right",
    extra_words: tuple[str, ...] = (),
    **special_token_kwargs: str,
) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer: ids 0..len(special_tokens)-1 are the special tokens, then words, then
    punctuation characters. `special_token_kwargs` names roles such as `eos_token="</s>"`."""
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *_WORDS, *extra_words, *string.punctuation]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(special_tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk_token,
        pad_token=pad_token,
        model_max_length=model_max_length,
        padding_side=padding_side,
        **special_token_kwargs,
    )
