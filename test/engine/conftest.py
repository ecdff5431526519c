"""Fixtures for engine tests: the golden data, a trained SentencePiece model, small checkpoints on disk.

`golden_dir` (the oracle data in test/data/golden/pi05_tiny) comes from test/conftest.py."""

from __future__ import annotations

import os

# Before anything imports Triton: its kernels then run as numpy programs (Triton fixes the mode when it loads, so
# a test file that set it itself was too late whenever another file had loaded Triton first, e.g. test_fp8.py run
# before test_geglu_kernel.py)
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pi05_ros.engine.checkpoint import load_model
from pi05_ros.engine.config import TINY
from pi05_ros.engine.demo import demo_tokenizer, random_model, write_checkpoint
from pi05_ros.engine.reference import ModelInputs, Pi05Model


def _scaled_mm_on_cpu() -> bool:
    """Whether this torch runs FP8 e4m3 GEMMs (torch._scaled_mm) on the CPU: CI's torch (2.13) does, older CPU
    builds do not, and then only test/gpu covers FP8."""
    one = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(one, one.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `cpu_fp8` skip where the CPU has no FP8 GEMM (probed once, only if such a test is collected)."""
    marked = [item for item in items if item.get_closest_marker("cpu_fp8")]
    if marked and not _scaled_mm_on_cpu():
        skip = pytest.mark.skip(reason="this torch has no FP8 GEMM on the CPU")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden_cases(golden_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(golden_dir / "cases.safetensors"))


@pytest.fixture(scope="session")
def golden_model(golden_dir: Path) -> Pi05Model:
    model, _ = load_model(golden_dir)
    return model


@pytest.fixture(scope="session")
def fast_case(golden_cases: dict[str, torch.Tensor], golden_model: Pi05Model) -> Callable[..., tuple]:
    """fast_case(k, row=0): golden case k's (images_u8 [V,224,224,3], token-table rows, noise) for sample_eager,
    its masked views and padding left out."""

    def make(k: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = f"case{k}/"
        views = [v for v in range(3) if golden_cases[f"{p}image_mask{v}"][row]]
        images = torch.stack([golden_cases[f"{p}image{v}_u8"][row] for v in views])
        ids = golden_cases[p + "tokens"][row][golden_cases[p + "token_mask"][row]]
        return images, golden_model.embed_tokens[ids], golden_cases[p + "noise"][row]

    return make


@pytest.fixture(scope="session")
def case_inputs(golden_cases: dict[str, torch.Tensor]) -> Callable[[int], ModelInputs]:
    """case_inputs(k): the model inputs of golden case k."""

    def make(k: int) -> ModelInputs:
        p = f"case{k}/"
        return ModelInputs(
            images=torch.stack([golden_cases[f"{p}image{v}"] for v in range(3)], dim=1),
            image_masks=torch.stack([golden_cases[f"{p}image_mask{v}"] for v in range(3)], dim=1),
            tokens=golden_cases[p + "tokens"],
            token_mask=golden_cases[p + "token_mask"],
            noise=golden_cases[p + "noise"],
        )

    return make


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real SentencePiece model, trained here, with PaliGemma's special ids."""
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_model() -> Pi05Model:
    return random_model(TINY, seed=3)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: Pi05Model) -> Path:
    return write_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "pi05_tiny_openpi", fmt="openpi")


class _ReplayingGraph:
    """On the CPU, where CUDA graphs do not exist: runs `fn` where `_Graph` does (two warm-ups; its capture only
    records), and replay runs it again, so the state a graph's making leaves behind is what a GPU's would be."""

    def __init__(self, fn, pool, capture_stream=None, warm_stream=None) -> None:
        for _ in range(2):
            fn()
        self.replay = fn


@pytest.fixture
def replaying_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pi05Pipeline makes `_ReplayingGraph`s instead of CUDA graphs: a pipeline built with use_graphs=False (the
    CPU's) and then set to use_graphs=True takes the graph path, failures at a graph's making included."""
    import pi05_ros.engine.fast.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "_Graph", _ReplayingGraph)
