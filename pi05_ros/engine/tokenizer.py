"""Prompt building and tokenization with the PaliGemma SentencePiece model.

Pi0.5 writes the normalized robot state into the prompt, discretized into 256 bins:
    "Task: {prompt}, State: {b0 b1 ...};\\nAction: "
Configs trained without state (pi05_libero) use the pi0 format: the cleaned prompt, then "\\n" encoded on its
own. Both start with BOS and are right-padded (id 0, mask False) or truncated to `max_len`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pi05_ros.engine.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

STATE_BINS = np.linspace(-1.0, 1.0, 256 + 1)[:-1]


def clean_prompt(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state_norm: np.ndarray) -> np.ndarray:
    """Normalized state -> bin indices (np.digitize over 256 equal bins of [-1, 1], minus one), as openpi."""
    return np.digitize(state_norm, bins=STATE_BINS) - 1


def pi05_prompt(prompt: str, state_norm: np.ndarray) -> str:
    state_str = " ".join(str(int(b)) for b in discretize_state(state_norm))
    return f"Task: {clean_prompt(prompt)}, State: {state_str};\nAction: "


class PromptTokenizer:
    """Turns (task prompt, normalized state) into fixed-length token ids and a validity mask."""

    def __init__(self, model_path: str | Path, max_len: int, state_in_prompt: bool = True) -> None:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"tokenizer {path} does not exist; pass the PaliGemma SentencePiece model "
                "(paligemma_tokenizer.model, ~4 MiB), e.g. from openpi's assets or the HF PaliGemma repo"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise CheckpointError(
                f"{path} is not a SentencePiece model ({exc}); pass paligemma_tokenizer.model"
            ) from exc
        self.path = path
        self.max_len = max_len
        self.state_in_prompt = state_in_prompt
        self._warned_for: str | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, prompt: str, state_norm: np.ndarray | None) -> list[int]:
        """Token ids of the full prompt, BOS first, not yet padded or truncated."""
        if self.state_in_prompt:
            if state_norm is None:
                raise InputError("this model writes the robot state into the prompt: pass the state")
            return self.sp.encode(pi05_prompt(prompt, state_norm), add_bos=True)
        return self.sp.encode(clean_prompt(prompt), add_bos=True) + self.sp.encode("\n")

    def __call__(self, prompt: str, state_norm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [max_len], mask bool [max_len]) for one observation."""
        if not prompt or not prompt.strip():
            raise InputError("the task prompt is empty; publish an instruction or set default_instruction")
        ids = self.encode(prompt, state_norm)
        if len(ids) > self.max_len:
            if self._warned_for != prompt:
                shown = prompt if len(prompt) <= 200 else prompt[:200] + f"... ({len(prompt)} characters)"
                log.warning("prompt is %d tokens, truncated to max_token_len=%d: %r", len(ids), self.max_len, shown)
                self._warned_for = prompt
            ids = ids[: self.max_len]
        tokens = np.zeros(self.max_len, dtype=np.int64)
        mask = np.zeros(self.max_len, dtype=bool)
        tokens[: len(ids)] = ids
        mask[: len(ids)] = True
        return tokens, mask
