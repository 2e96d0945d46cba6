"""`turboflow` CLI papercuts: device errors, --version, --help, progress for every stage, quiet library loggers,
random vs explicit seeds, every attention type offered, an unavailable one refused with its reason."""

import io
import json
import logging
import subprocess
import sys

import pytest
import torch

from turboflow.cli import main
from turboflow.engine.request import UNAVAILABLE_ATTENTION
from turboflow.engine.video import probe_video

# one frame: what these tests check (seeds, errors, loggers) does not depend on the length; the progress test asks
# for 5 frames, the decode's count is what it checks
FAST_ARGS = ["--resolution", "480p", "--aspect-ratio", "4:3", "--frames", "1", "--steps", "1"]


def _generate(model, out, *extra):
    return main(
        [
            "generate",
            "t2v",
            "--model",
            str(model),
            "--prompt",
            "a red fox",
            *FAST_ARGS,
            "--device",
            "cpu",
            "--out",
            str(out),
            *extra,
        ]
    )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_unavailable_device_is_a_typed_error_not_a_traceback(tiny_t2v_dir, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "turboflow.cli",
            "generate",
            "t2v",
            "--model",
            str(tiny_t2v_dir),
            "--prompt",
            "x",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "v.mp4"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error[device_unavailable]: device 'cuda' is unavailable" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize(
    "device,says", [("cuda:1", "unavailable"), ("mps", "MPS"), ("gpu0", "not a device name"), ("meta", "not supported")]
)
def test_every_unusable_device_string_is_refused_before_loading(tiny_t2v_dir, tmp_path, capsys, device, says):
    if device.startswith("cuda") and torch.cuda.device_count() > 1:
        pytest.skip("this host has that GPU")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this host has MPS")
    assert _generate(tiny_t2v_dir, tmp_path / "v.mp4", "--device", device) == 2
    err = capsys.readouterr().err
    assert err.startswith("error[device_unavailable]: ") and says in err


def test_version_prints_the_package_version(capsys):
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"turboflow {pyproject['project']['version']}"


def test_help_is_for_users_and_lists_the_verbs_by_task(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "Generate videos" in text and "registers its own verbs" not in text  # not the module docstring
    epilog = text[text.index("commands by task:") :]
    for verb in ("generate", "model", "dev", "submit", "events", "serve", "manifests"):
        assert verb in epilog
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "{original,sla,sagesla}" in capsys.readouterr().out


def test_progress_covers_every_stage_including_the_decode_on_a_terminal(tiny_t2v_dir, tmp_path, monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert _generate(tiny_t2v_dir, tmp_path / "v.mp4", "--seed", "3", "--frames", "5") == 0
    shown = terminal.getvalue()
    for label in ("text encode", "rCM steps", "VAE decode"):
        assert label in shown, shown
    assert "5/5" in shown  # the decode counts the 5 frames
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert _generate(tiny_t2v_dir, tmp_path / "q.mp4", "--seed", "3", "--quiet") == 0
    assert quiet.getvalue() == ""
    capsys.readouterr()


def test_no_progress_when_stderr_is_not_a_terminal(tiny_t2v_dir, tmp_path, capsys):
    assert _generate(tiny_t2v_dir, tmp_path / "v.mp4", "--seed", "3") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert json.loads(captured.out)["seed"] == 3


def test_omitted_seed_is_random_and_printed_seed_zero_is_zero(tiny_t2v_dir, tmp_path, capsys):
    records = []
    for name, extra in (("a", ()), ("b", ()), ("zero", ("--seed", "0"))):
        assert _generate(tiny_t2v_dir, tmp_path / f"{name}.mp4", *extra) == 0
        records.append(json.loads(capsys.readouterr().out))
    first, second, zero = records
    assert first["seed"] != second["seed"] and "timings" in first
    assert zero["seed"] == 0
    # the printed seed reproduces the video
    assert _generate(tiny_t2v_dir, tmp_path / "again.mp4", "--seed", str(first["seed"])) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["video"]["sha256"] == first["video"]["sha256"]
    assert probe_video(tmp_path / "zero.mp4").num_frames == 1


def test_sagesla_generates_and_other_names_fail_with_their_reason(tiny_t2v_dir, tmp_path, capsys, monkeypatch):
    assert _generate(tiny_t2v_dir, tmp_path / "v.mp4", "--attention", "sagesla", "--seed", "3") == 0
    assert probe_video(tmp_path / "v.mp4").num_frames == 1
    capsys.readouterr()
    assert _generate(tiny_t2v_dir, tmp_path / "v.mp4", "--attention", "flash9") == 2
    assert "error[invalid_attention]" in capsys.readouterr().err
    monkeypatch.setitem(UNAVAILABLE_ATTENTION, "flash4", "attention 'flash4' is not in this build")
    assert _generate(tiny_t2v_dir, tmp_path / "v.mp4", "--attention", "flash4") == 2
    assert capsys.readouterr().err.strip() == "error[unsupported_option]: attention 'flash4' is not in this build"


CHATTY = ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer")


def test_library_loggers_are_quiet_unless_verbose(tiny_t2v_dir, capsys):
    assert main(["model", "verify", str(tiny_t2v_dir)]) == 0
    assert not any(logging.getLogger(name).isEnabledFor(logging.INFO) for name in CHATTY)
    assert all(logging.getLogger(name).isEnabledFor(logging.WARNING) for name in CHATTY)
    assert main(["-v", "model", "verify", str(tiny_t2v_dir)]) == 0
    # -v: they follow the root logger's level again (DEBUG in a fresh process; pytest owns the root here)
    assert all(logging.getLogger(name).level == logging.NOTSET for name in CHATTY)
    assert main(["model", "verify", str(tiny_t2v_dir)]) == 0  # and back: nothing leaks between invocations
    assert not logging.getLogger("botocore").isEnabledFor(logging.INFO)
    capsys.readouterr()
