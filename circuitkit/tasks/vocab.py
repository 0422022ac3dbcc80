"""The one small word-level vocabulary that every toy task and toy model shares.

Toy models are trained here from scratch, so their vocabulary is ours to choose: one
token per digit, per two-digit year, per name and per template word. Keeping all five
toy tasks on one vocabulary lets a single model (``toy-multitask``) learn them all.
The token list is fixed (its order is part of every shipped checkpoint); add new words
only at the end, and bump ``VOCAB_VERSION``.
"""

from __future__ import annotations

from functools import cached_property

import torch

from circuitkit import CircuitkitError

VOCAB_VERSION = 1
# The vocabulary tag a checkpoint card records for a model on this vocabulary.
TOY_VOCAB = f"toy-v{VOCAB_VERSION}"

SPECIALS = ["<pad>", "<bos>"]
DIGITS = [str(d) for d in range(10)]
ADDITION_SYMBOLS = ["+", "="]
YEARS = [f"{y:02d}" for y in range(100)]  # two-digit year tokens, as GPT-2 splits "1732" -> "17", "32"
NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Sarah",
         "Paul", "Kate", "Mark", "Lucy", "Dan", "Emma", "Sam", "Rose"]
IOI_PLACES = ["store", "park", "school", "garden"]
IOI_OBJECTS = ["book", "ball", "drink", "ring"]
IOI_WORDS = ["When", "and", "went", "to", "the", ",", "gave", "a"]
GT_WORDS = ["The", "war", "lasted", "from", "year"]  # "to", "the" are shared with IOI
DOC_WORDS = ["def", "(", ")", ":", '"""', ":param"]
DOC_FUNCS = ["load", "save", "fit", "plot"]
DOC_ARGS = ["x", "y", "size", "name", "path", "data", "mode", "key",
            "value", "index", "count", "shape", "axis", "seed", "step", "text"]
DOC_DESC = ["the", "input", "number", "of", "items", "file", "new", "old"]
INDUCTION_SYMBOLS = [f"w{i:02d}" for i in range(48)]

_ALL = (SPECIALS + DIGITS + ADDITION_SYMBOLS + YEARS + NAMES + IOI_PLACES + IOI_OBJECTS
        + IOI_WORDS + GT_WORDS + DOC_WORDS + DOC_FUNCS + DOC_ARGS + DOC_DESC + INDUCTION_SYMBOLS)


class ToyVocab:
    """Word-level vocabulary: ``encode`` takes a list of words, ``decode`` returns them.

    Words that occur in several groups (``the``, ``to``) get one id.
    """

    def __init__(self) -> None:
        tokens: list[str] = []
        for t in _ALL:
            if t not in tokens:
                tokens.append(t)
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self.index["<pad>"]

    @property
    def bos_id(self) -> int:
        return self.index["<bos>"]

    @cached_property
    def d_vocab(self) -> int:
        """Model vocabulary size: the token count rounded up to a multiple of 16."""
        return ((len(self.tokens) + 15) // 16) * 16

    def id(self, word: str) -> int:
        try:
            return self.index[word]
        except KeyError:
            raise CircuitkitError(
                f"{word!r} is not in the toy vocabulary; use one of the words in "
                "circuitkit.tasks.vocab (e.g. NAMES, DOC_ARGS)") from None

    def ids(self, words: list[str]) -> list[int]:
        return [self.id(w) for w in words]

    def encode(self, words: list[str]) -> torch.Tensor:  # [pos]
        return torch.tensor(self.ids(words), dtype=torch.long)

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] if int(i) < len(self.tokens) else f"<unused{int(i)}>" for i in ids]

    def to_string(self, ids) -> str:
        return " ".join(self.decode(ids))


VOCAB = ToyVocab()


def is_toy(model) -> bool:
    """True for models on circuitkit's toy vocabulary (toy tasks apply).

    ``model`` is a ``HookedTransformer``; it is read duck-typed (``circuitkit_vocab``,
    ``tokenizer``, ``cfg.d_vocab``) so that tasks need not import the model layer.
    """
    return getattr(model, "circuitkit_vocab", None) == TOY_VOCAB or (
        getattr(model, "tokenizer", None) is None and model.cfg.d_vocab == VOCAB.d_vocab)
