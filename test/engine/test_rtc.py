"""Real-time chunking (engine/rtc.py) on the reference and on the fast path's layers, on the CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pi05_ros.engine.fast.blocks import FastModel, prefill_eager
from pi05_ros.engine.reference import euler_schedule
from pi05_ros.engine.rtc import Guidance, guidance_weight, guided_velocity, prefix_weights


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_prefix_weights_follow_kinetix() -> None:
    # Kinetix's documented example (start 2, end 6, 10 actions) and its exponential variant
    np.testing.assert_allclose(prefix_weights(2, 6, 10, "linear"), [1, 1, .8, .6, .4, .2, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(prefix_weights(2, 6, 10, "exp"), [1, 1, .571, .287, .114, .026, 0, 0, 0, 0],
                               atol=1e-3)
    np.testing.assert_array_equal(prefix_weights(2, 6, 10, "ones"), [1] * 6 + [0] * 4)
    np.testing.assert_array_equal(prefix_weights(2, 6, 10, "zeros"), [1] * 2 + [0] * 8)
    np.testing.assert_array_equal(prefix_weights(12, 6, 10, "linear"), [1] * 6 + [0] * 4)  # delay past the end
    with pytest.raises(ValueError, match="unknown RTC schedule"):
        prefix_weights(2, 6, 10, "cosine")


def test_guidance_weight_is_clipped_and_symmetric() -> None:
    weights = [guidance_weight(t, 5.0) for t, _ in euler_schedule(10)]
    np.testing.assert_allclose(weights, [5, 5, 4.25, 2.762, 2.167, 2.0, 2.167, 2.762, 4.25, 5], atol=1e-3)
    assert guidance_weight(0.3, 100.0) == pytest.approx(guidance_weight(0.7, 100.0))


@pytest.fixture(scope="module")
def case(golden_model, case_inputs):
    inputs = case_inputs(0)
    plain = golden_model.sample_actions(inputs, 10)
    other = golden_model.sample_actions(dataclasses.replace(inputs, noise=torch.randn(
        inputs.noise.shape, generator=torch.Generator().manual_seed(5))), 10)  # a chunk that disagrees
    return inputs, plain, other


def guidance_of(g: Guidance) -> tuple[torch.Tensor, torch.Tensor, float]:
    return torch.from_numpy(g.previous)[None], torch.from_numpy(g.weights)[None], g.beta


def test_beta_zero_is_plain_sampling(golden_model, case) -> None:
    inputs, plain, other = case
    g = Guidance.build(other[0].numpy(), delay=3, end=8, beta=0.0)
    assert torch.equal(golden_model.sample_actions(inputs, 10, guidance=guidance_of(g)), plain)


def test_guidance_reproduces_the_committed_actions(golden_model, case) -> None:
    inputs, plain, other = case
    d = 3
    plain_err = rel_err(plain[0, :d, :7], other[0, :d, :7])
    for beta, budget in ((5.0, 0.1), (10.0, 0.02)):
        g = Guidance.build(other[0].numpy(), delay=d, end=8, beta=beta, schedule="exp", columns=7)
        out = golden_model.sample_actions(inputs, 10, guidance=guidance_of(g))
        err = rel_err(out[0, :d, :7], other[0, :d, :7])
        # measured on this model: plain 1.47 apart; beta 5 -> 0.033, beta 10 -> 0.0056 (budget ~3x that)
        assert err < budget < plain_err, (beta, err, plain_err)


def test_guidance_equals_a_finite_difference_vjp(golden_model, case) -> None:
    """g = (d clean / d x)^T err, checked along random directions u: g . u == err . (J u)."""
    inputs, _, other = case
    embeds, valid = golden_model.embed_prefix(inputs, None)
    cache = golden_model.prefill(embeds, valid)
    t = 0.6
    times = torch.full((1,), t)
    x = inputs.noise.clone() * 0.7 + other * 0.3

    def clean(z: torch.Tensor) -> torch.Tensor:
        return z - t * golden_model.velocity(z, times, cache)

    weights = torch.from_numpy(prefix_weights(3, 8, x.shape[1], "linear"))[None, :, None].expand_as(x)
    with torch.enable_grad():
        z = x.clone().requires_grad_(True)
        err = (weights * (other - clean(z))).detach()
        (g,) = torch.autograd.grad(clean(z), z, grad_outputs=err)
    # and guided_velocity returns v - w * g with exactly that g
    v = golden_model.velocity(x, times, cache)
    guided = guided_velocity(lambda z: golden_model.velocity(z, times, cache), x, t, other, weights, 5.0)
    torch.testing.assert_close(guided, v - guidance_weight(t, 5.0) * g, rtol=1e-5, atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        u = torch.randn(x.shape, generator=gen)
        eps = 1e-2
        jvp = (clean(x + eps * u) - clean(x - eps * u)) / (2 * eps)
        # float32 central differences at eps 1e-2: ~1e-4 relative measured
        assert float((g * u).sum()) == pytest.approx(float((err * jvp).sum()), rel=1e-3)


@pytest.mark.parametrize("beta", [0.0, 5.0])
def test_fast_path_layers_follow_the_reference(golden_model, fast_case, case, beta: float) -> None:
    """FastModel.guided_step (re-packed weights, the fast path's layer functions) == the reference's RTC."""
    inputs, _, other = case
    fast = FastModel(golden_model, torch.float32)
    images, rows, noise = fast_case(0)
    prefix = prefill_eager(fast, images, rows)
    g = Guidance.build(other[0].numpy(), delay=3, end=8, beta=beta, schedule="exp", columns=7)
    want = golden_model.sample_actions(inputs, 10, guidance=guidance_of(g))[0]
    mods, final, out_w, out_b = fast.step_schedule(10)
    x = noise.clone()[None]
    previous, weights = torch.from_numpy(g.previous)[None], torch.from_numpy(g.weights)[None]
    for step, (t, dt) in enumerate(euler_schedule(10)):
        fast.guided_step(x, prefix.n_valid, prefix.keys, prefix.values, mods[step], final[step], out_w, out_b,
                         t, dt, previous, weights, beta, compiled=False)
    assert rel_err(x[0], want) < 1e-5  # float32; the fast path alone is ~2e-7 from the reference


def test_guided_steps_in_the_pipelines_cache_under_no_grad(golden_model, fast_case, case) -> None:
    """The pipeline's way: whole cache tensors, every step under no_grad (its `run`), one step after another
    (each step's recorded write must not block the next). Same result as the plain loop."""
    inputs, _, other = case
    fast = FastModel(golden_model, torch.float32)
    images, rows, noise = fast_case(0)
    prefix = prefill_eager(fast, images, rows)
    g = Guidance.build(other[0].numpy(), delay=3, end=8, beta=5.0, schedule="exp", columns=7)
    want = golden_model.sample_actions(inputs, 10, guidance=guidance_of(g))[0]
    mods, final, out_w, out_b = fast.step_schedule(10)
    x = noise.clone()[None]
    previous, weights = torch.from_numpy(g.previous)[None], torch.from_numpy(g.weights)[None]
    total = prefix.keys[0].shape[2]
    with torch.no_grad():
        with_views = [k[:, :, :total] for k in prefix.keys]  # what `run` used to hand over: no_grad views
        with pytest.raises(RuntimeError, match="no_grad"):
            fast.guided_step(x.clone(), prefix.n_valid, with_views, [v[:, :, :total] for v in prefix.values],
                             mods[0], final[0], out_w, out_b, 1.0, -0.1, previous, weights, 5.0, compiled=False)
        for step, (t, dt) in enumerate(euler_schedule(10)):
            fast.guided_step_in_cache(x, prefix.n_valid, prefix.keys, prefix.values, total, mods[step], final[step],
                                      out_w, out_b, t, dt, previous, weights, 5.0, compiled=False)
    assert all(k.grad_fn is None and not k.requires_grad for k in (*prefix.keys, *prefix.values))
    assert rel_err(x[0], want) < 1e-5  # float32, as above


# --- the Policy's RtcRequest: robot terms in, the guidance in model units


@pytest.fixture(scope="module")
def delta_policy():
    """The demo model with a delta action space (joints relative to the state, the gripper absolute)."""
    from pi05_ros.engine.action_space import ActionSpace
    from pi05_ros.engine.policy import Policy

    demo = Policy.demo(device="cpu")
    space = ActionSpace.from_mask([True] * 6 + [False], demo.action_dof)
    return Policy(demo.model, demo.tokenizer, demo.norm_stats, precision=demo.precision, action_space=space,
                  is_demo=True)


def observation(seed: int):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    return {"base_0_rgb": image}, rng.uniform(-1, 1, 7).astype(np.float32)


def test_the_previous_chunk_returns_to_the_models_units(delta_policy) -> None:
    from pi05_ros.engine.rtc import RtcRequest

    images, state = observation(0)
    noise = np.random.default_rng(1).standard_normal((10, 32)).astype(np.float32)
    chunk = delta_policy.infer(images, state, "pick up the cube", 3, noise=noise)
    normalized, _ = delta_policy.runner.run(delta_policy.prepare(images, state, "pick up the cube", noise), 3)
    guidance = delta_policy.rtc_guidance(RtcRequest(chunk.actions, delay=2, beta=5.0), state)
    # un-normalize + add the state, then subtract it + normalize: float32 round trip
    np.testing.assert_allclose(guidance.previous[:, :7], normalized[:, :7], rtol=1e-5, atol=1e-5)
    assert not guidance.previous[:, 7:].any() and not guidance.weights[:, 7:].any()  # padding unguided
    late = delta_policy.rtc_guidance(RtcRequest(chunk.actions[3:], delay=0, beta=5.0, start=3), state)
    assert not late.weights[:3].any() and late.weights[3:].any()  # actions run before the inference: unguided
    np.testing.assert_allclose(late.previous[3:, :7], normalized[3:, :7], rtol=1e-5, atol=1e-5)


def test_policy_rtc_reproduces_the_committed_actions_in_robot_units(delta_policy) -> None:
    from pi05_ros.engine.rtc import RtcRequest

    images, state = observation(2)
    previous = delta_policy.infer(images, state, "pick up the cube", 10).actions  # another noise draw
    noise = np.random.default_rng(3).standard_normal((10, 32)).astype(np.float32)
    plain = delta_policy.infer(images, state, "pick up the cube", 10, noise=noise).actions
    zero = delta_policy.infer(images, state, "pick up the cube", 10, noise=noise,
                              rtc=RtcRequest(previous, delay=3, beta=0.0)).actions
    np.testing.assert_array_equal(zero, plain)  # beta 0: plain inference
    guided = delta_policy.infer(images, state, "pick up the cube", 10, noise=noise,
                                rtc=RtcRequest(previous, delay=3, beta=10.0, end=8)).actions
    d = 3
    before = np.linalg.norm(plain[:d] - previous[:d]) / np.linalg.norm(previous[:d])
    after = np.linalg.norm(guided[:d] - previous[:d]) / np.linalg.norm(previous[:d])
    # the committed actions' gap shrinks by an order of magnitude (measured on the demo model: see the print)
    print(f"committed-action gap: plain {before:.3e}, rtc beta 10 {after:.3e}")
    assert after < 0.2 * before


def test_bad_rtc_requests_are_input_errors(delta_policy) -> None:
    from pi05_ros.engine.errors import InputError
    from pi05_ros.engine.rtc import RtcRequest

    images, state = observation(4)
    for request, match in ((RtcRequest(np.zeros((5, 6)), 1), "must be \\[actions, 7\\]"),
                           (RtcRequest(np.full((5, 7), np.nan), 1), "NaN"),
                           (RtcRequest(np.zeros((5, 7)), -1), "must be >= 0"),
                           (RtcRequest(np.zeros((5, 7)), 1, schedule="cosine"), "unknown rtc schedule")):
        with pytest.raises(InputError, match=match):
            delta_policy.infer(images, state, "go", 3, rtc=request)
