"""The word-level tokenizer of edgevl-tiny, built with HF ``tokenizers`` (a tokenizer.json).

The world has a closed vocabulary, so one token per word is both the smallest and the most
honest choice; the runtime reads the same tokenizer.json as any other model's.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<bos>", "<eos>", "<image>"
SPECIALS = (PAD, UNK, BOS, EOS, IMAGE)
PROMPT_TEMPLATE = "<bos>{image}question: {prompt} answer:"


def build_tokenizer(words: list[str]) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # plain words joined by spaces
    tok.add_special_tokens(list(SPECIALS))
    return tok
