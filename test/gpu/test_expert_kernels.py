"""The fused expert kernels at full size in bf16 against their torch definition (the CPU tests cover fp32)."""

from __future__ import annotations

import pytest
import torch

from pi05_ros.engine.config import PRESETS
from pi05_ros.engine.demo import random_model
from pi05_ros.engine.fast.blocks import FastModel, prefill_eager
from pi05_ros.engine.fast.kernels.expert import ExpertKernels, KernelConfig, expert_layer_torch, layer_weights_torch

pytestmark = pytest.mark.gpu


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("pdl", [True, False], ids=["pdl", "no-pdl"])
def test_full_size_layer_equals_its_torch_definition(pdl: bool) -> None:
    model = random_model(PRESETS["pi05"], seed=0, device="cuda", dtype=torch.bfloat16)
    fast = FastModel(model, torch.bfloat16, release_reference=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8, generator=gen)
    prefix = prefill_eager(fast, images, fast.token_table[torch.randint(4, 30_000, (48,), generator=gen)])
    kernels = ExpertKernels(fast, KernelConfig(pdl=pdl))
    sched = kernels.schedule(fast.step_schedule(10))
    x = torch.randn(50, 1024, device="cuda")
    for layer in (0, 17):
        k_kern, v_kern = prefix.keys[layer][0, 0].clone(), prefix.values[layer][0, 0].clone()
        k_ref, v_ref = k_kern.clone(), v_kern.clone()
        out = x.clone()
        ssp = kernels.modulate(out, sched[0][4, layer, 0])
        kernels.layer(out, layer, sched[0][4, layer], None, sched[4][4, layer], sched[5][4, layer], k_kern, v_kern,
                      prefix.n_valid, ssp)
        ref = expert_layer_torch(x, sched[0][4, layer], sched[4][4, layer], sched[5][4, layer],
                                 *layer_weights_torch(kernels, layer), k_ref, v_ref, int(prefix.n_valid),
                                 fast.rope_cos, fast.rope_sin, kernels.heads, kernels.head_dim, kernels.eps,
                                 torch.bfloat16)
        torch.cuda.synchronize()
        err = rel_err(out, ref)
        print(f"KERNEL layer {layer} pdl={pdl}: x rel_l2 {err:.3e}, "
              f"k {rel_err(k_kern, k_ref):.3e}")
        # same bf16 GEMM inputs; only accumulation order and the attention's bf16 rounding of p differ
        assert err < 1e-2 and rel_err(k_kern, k_ref) < 1e-2 and rel_err(v_kern, v_ref) < 1e-2
        assert all(not count.any() for _, count in kernels.ws.values())
