"""A probe for the tests that check a vocabulary-wide [B, T, V] tensor is never materialised."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestVocabAllocation(TorchDispatchMode):
    """Records the most elements of any newly allocated op output (forward and backward) whose last
    dimension is the vocabulary.

    Views of an op's inputs (lm_head's weight transposed or expanded inside the matmul) allocate
    nothing and are skipped.
    """

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.most_elements = vocab, 0

    @property
    def most_rows(self) -> int:
        """The most vocabulary-wide rows one such output held."""
        return self.most_elements // self.vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs):
                self.most_elements = max(self.most_elements, t.numel())
        return out
