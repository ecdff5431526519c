"""pi05-serve's own errors: what a user can get wrong on the command line gets one line that says what to do,
and exit status 1 (or argparse's 2), before any model is loaded where it can be."""

from __future__ import annotations

from pathlib import Path

import pytest

from pi05_ros.cli.serve import main


@pytest.mark.parametrize(("argv", "message"), [
    ([], "give --checkpoint DIR --tokenizer FILE, or --demo"),
    (["--demo", "--checkpoint", "/ckpt"], "give --checkpoint DIR --tokenizer FILE, or --demo"),
    (["--demo", "--metadata", "{oops"], "--metadata is not valid JSON"),
    (["--demo", "--metadata", "[1, 2]"], "--metadata must be a JSON object"),
    (["--demo", "--config-preset", "pi05_aloha"], "--config-preset go with --checkpoint"),
    (["--demo", "--tokenizer", "t.model", "--norm-stats", "n.json"], "--tokenizer, --norm-stats go with"),
    (["--demo", "--joint-convention", "none"], "--joint-convention go with --checkpoint"),
])
def test_usage_errors_exit_with_a_reason(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert message in str(exited.value)


@pytest.mark.parametrize(("argv", "message"), [
    (["--demo", "--robot", "franka"], "unknown robot layout 'franka'; choose one of droid, libero, aloha, pi05_ros"),
    (["--demo", "--max-batch", "0"], "max batch and max clients >= 1"),
    (["--demo", "--num-steps", "500"], "num_steps must be in 1..100"),
    (["--checkpoint", "/no/such/ckpt", "--tokenizer", "/no/tok.model", "--device", "cpu"], "/no/such/ckpt"),
])
def test_bad_settings_exit_1_with_the_reason(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--demo", "--port", "99999"], "argument --port: expected an integer in 0..65535, got 99999"),
    (["--demo", "--port", "-1"], "argument --port: expected an integer in 0..65535, got -1"),
    (["--demo", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["--demo", "--threads", "-2"], "argument --threads: expected an integer >= 1, got -2"),
    (["--demo", "--ray", "--replicas", "0"], "argument --replicas: expected an integer >= 1, got 0"),
    (["--demo", "--action-dim", "x"], "argument --action-dim: expected an integer, got 'x'"),
])
def test_out_of_range_numbers_are_argument_errors(argv: list[str], message: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    """Before any model or Ray cluster starts (a port past 65535 used to wrap around to another port)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_a_checkpoint_needs_a_tokenizer(droid_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--checkpoint", str(droid_checkpoint), "--device", "cpu"]) == 1
    assert "--checkpoint needs --tokenizer" in capsys.readouterr().err
    # with --ray too, before Ray starts (it used to fail in every replica, after Ray and Serve had started)
    import ray

    assert main(["--checkpoint", str(droid_checkpoint), "--device", "cpu", "--ray"]) == 1
    assert "--checkpoint needs --tokenizer" in capsys.readouterr().err
    assert main(["--checkpoint", str(droid_checkpoint), "--tokenizer", "/no/tok.model", "--device", "cpu",
                 "--ray"]) == 1
    assert "--tokenizer /no/tok.model: no such file" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_ray_checks_warm_up_views_against_the_model_before_ray_starts(droid_checkpoint: Path, serve_tokenizer: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """The pi05_ros layout names no cameras of its own: the counts are checked against the checkpoint's camera
    slots (3), read without loading it; a wrong count used to fail in every replica after its model load."""
    import ray

    assert main(["--checkpoint", str(droid_checkpoint), "--tokenizer", str(serve_tokenizer), "--device", "cpu",
                 "--ray", "--robot", "pi05_ros", "--warm-up-views", "2,4"]) == 1
    assert "warm-up view counts must be in 1..3 (the model's camera slots), got [2, 4]" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_model_options_reach_the_policy_spec() -> None:
    from pi05_ros.cli.serve import _spec, build_parser

    spec = _spec(build_parser().parse_args(["--demo", "--fp8-vision", "--expert-kernels", "on", "--max-batch", "4"]))
    assert (spec.fp8_vision, spec.expert_kernels, spec.max_batch) == (True, "on", 4)
    spec = _spec(build_parser().parse_args(["--demo"]))
    assert (spec.fp8_vision, spec.expert_kernels) == (False, "auto")  # what was measured (docs/serving.md)
    spec = _spec(build_parser().parse_args(["--checkpoint", "/ckpt", "--tokenizer", "t", "--joint-convention",
                                            "none", "--action-space", "delta", "--action-space-mask",
                                            "true,false", "--prompt-format", "pi0", "--image-resize", "lerobot"]))
    assert (spec.joint_convention, spec.action_space, spec.action_space_mask, spec.prompt_format,
            spec.image_resize) == ("none", "delta", (True, False), "pi0", "lerobot")
    # relative paths are made absolute: a Ray worker resolves them against its own working directory
    spec = _spec(build_parser().parse_args(["--checkpoint", "ckpt", "--tokenizer", "~/t.model"]))
    assert spec.checkpoint == str(Path.cwd() / "ckpt") and spec.tokenizer == str(Path.home() / "t.model")


def test_an_unknown_expert_kernels_choice_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--demo", "--expert-kernels", "fast"])
    assert exited.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
