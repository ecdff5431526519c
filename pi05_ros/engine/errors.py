"""Errors a user can cause. Each message names the cause and the fix."""


class Pi05Error(Exception):
    """Base class of every error the engine raises on purpose."""


class InputError(Pi05Error, ValueError):
    """An observation the policy cannot use (bad image, NaN state, empty prompt, unknown camera slot)."""


class CheckpointError(Pi05Error):
    """A checkpoint, tokenizer or normalization file that cannot be loaded as given."""
