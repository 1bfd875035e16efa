"""Training-flag discipline: a computation that needs eval (or train) mode restores each module's
own flag afterwards, whatever happens, so callers never find a model silently switched."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def mode(training: bool, *modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in train (``training``) or eval mode; restore each one's flag after."""
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.train(training)
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.train(flag)


def eval_mode(*modules: nn.Module) -> contextlib.AbstractContextManager[None]:
    return mode(False, *modules)


def train_mode(*modules: nn.Module) -> contextlib.AbstractContextManager[None]:
    return mode(True, *modules)
