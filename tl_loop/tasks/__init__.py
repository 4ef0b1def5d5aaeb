"""Synthetic tasks with a known mechanism, for training and checking small looped models.

* :mod:`tl_loop.tasks.varbind` -- multi-hop variable binding (``a=7;b=a;c=b;...;c?``);
* :mod:`tl_loop.tasks.tokenizer` -- the character-level tokenizer shipped with the models.
"""

from tl_loop.tasks.tokenizer import CharTokenizer
from tl_loop.tasks.varbind import (
    Mechanism,
    Problem,
    VarBindTask,
    corrupt_distractor,
    corrupt_link,
    corrupt_root,
    make_tokenizer,
)

__all__ = [
    "CharTokenizer",
    "Mechanism",
    "Problem",
    "VarBindTask",
    "corrupt_distractor",
    "corrupt_link",
    "corrupt_root",
    "make_tokenizer",
]
