"""Prompt formats and tokenization with a real SentencePiece model trained for the test."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pi05_ros.engine.errors import CheckpointError, InputError
from pi05_ros.engine.tokenizer import PromptTokenizer, discretize_state, pi05_prompt


def test_discretization_matches_openpi_bins() -> None:
    state = np.array([-1.0, -0.99, 0.0, 0.5, 0.999, 1.0, 1.7, -1.3])
    # digitize over linspace(-1, 1, 257)[:-1], minus one; no clipping (below -1 gives -1, as openpi)
    assert discretize_state(state).tolist() == [0, 1, 128, 192, 255, 255, 255, -1]


def test_pi05_prompt_format() -> None:
    text = pi05_prompt("  pick_up the\ncube ", np.array([0.0, -1.0, 0.999]))
    assert text == "Task: pick up the cube, State: 128 0 255;\nAction: "


def test_tokens_bos_padding_and_mask(tokenizer_path: Path) -> None:
    tok = PromptTokenizer(tokenizer_path, max_len=64, state_in_prompt=True)
    ids, mask = tok("put the cup in the sink", np.zeros(3))
    expected = tok.sp.encode("Task: put the cup in the sink, State: 128 128 128;\nAction: ", add_bos=True)
    n = len(expected)
    assert ids.dtype == np.int64 and mask.dtype == bool and ids.shape == mask.shape == (64,)
    assert ids[0] == 2 and ids[:n].tolist() == expected  # BOS is id 2, as in PaliGemma's vocabulary
    assert mask[:n].all() and not mask[n:].any() and (ids[n:] == 0).all()
    assert tok.sp.id_to_piece(int(ids[expected.index(tok.sp.piece_to_id("\n"))])) == "\n"


def test_pi0_format_encodes_newline_separately(tokenizer_path: Path) -> None:
    tok = PromptTokenizer(tokenizer_path, max_len=32, state_in_prompt=False)
    ids, mask = tok("close the gripper", None)
    expected = tok.sp.encode("close the gripper", add_bos=True) + tok.sp.encode("\n")
    assert ids[: mask.sum()].tolist() == expected


def test_truncation_warns_once(tokenizer_path: Path, caplog) -> None:
    tok = PromptTokenizer(tokenizer_path, max_len=8, state_in_prompt=True)
    with caplog.at_level(logging.WARNING):
        ids, mask = tok("stack the blocks", np.zeros(7))
        tok("stack the blocks", np.zeros(7))
    assert mask.all() and ids.shape == (8,)
    assert caplog.text.count("truncated to max_token_len=8") == 1


def test_errors(tokenizer_path: Path, tmp_path: Path) -> None:
    tok = PromptTokenizer(tokenizer_path, max_len=8, state_in_prompt=True)
    with pytest.raises(InputError, match="prompt is empty"):
        tok("   ", np.zeros(2))
    with pytest.raises(CheckpointError, match="does not exist"):
        PromptTokenizer(tmp_path / "missing.model", 8)
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        PromptTokenizer(tmp_path / "bad.model", 8)
