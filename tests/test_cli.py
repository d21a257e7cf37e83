"""`starflow-v`: every subcommand end to end with the bundled model, and clear errors for bad input."""

import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from starflow_diffusers.cli import main
from starflow_diffusers.training.synthetic import ClipSpec, ObjectSpec, render_clip, write_video


SPEC = ClipSpec((ObjectSpec("circle", "red", "right", "fast"),))


def _read_mp4(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3) for frame in reader]
    return meta, np.stack(frames)


@pytest.fixture(scope="module")
def source_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    frames = render_clip(SPEC, num_frames=9, seed=1)
    write_video(str(folder / "clip.mp4"), frames, fps=16)
    Image.fromarray(frames[0]).save(folder / "first.png")
    return folder


def test_generate_writes_an_h264_mp4(tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(["generate", SPEC.caption, "-o", str(out), "--num-frames", "5", "--upscale", "2"]) == 0
    meta, frames = _read_mp4(out)
    assert meta["codec"] == "h264" and frames.shape == (5, 64, 64, 3)
    assert "wrote" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name != "out.mp4"]  # no partial file left behind


def test_image_to_video_video_to_video_and_likelihood(tmp_path, source_clip, capsys):
    out = tmp_path / "i2v.mp4"
    main(["image-to-video", str(source_clip / "first.png"), SPEC.caption, "-o", str(out), "--num-frames", "5", "--upscale", "1"])
    assert _read_mp4(out)[1].shape == (5, 32, 32, 3)
    out = tmp_path / "v2v.mp4"
    main(["video-to-video", str(source_clip / "clip.mp4"), "a blue circle moving right", "-o", str(out), "--strength", "0.3", "--upscale", "1"])
    assert _read_mp4(out)[1].shape == (9, 32, 32, 3)
    capsys.readouterr()
    main(["likelihood", str(source_clip / "clip.mp4"), "--prompt", SPEC.caption])
    bits = float(capsys.readouterr().out.split(": ")[1].split()[0])
    assert 0 < bits < 8


def test_unknown_words_are_reported(tmp_path, capsys):
    main(["generate", "a corgi moving left", "-o", str(tmp_path / "out.mp4"), "--num-frames", "2"])
    assert "does not know 'corgi'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "a red circle", "-o", "out.gif"], "--output 'out.gif' must end in .mp4"),
        (["generate", "a red circle", "-o", "/no/such/folder/out.mp4"], "does not exist"),
        (["generate", "a red circle", "-o", "out.mp4", "--model", "/no/such/model"], "--model '/no/such/model' is not a pipeline folder"),
        (["generate", "a red circle", "-o", "out.mp4", "--num-frames", "0"], "--num-frames: expected a positive integer"),
        (["generate", "a red circle", "-o", "out.mp4", "--guidance-scale", "0.5"], "--guidance-scale: expected a finite number >= 1"),
        (["generate", "a red circle", "-o", "out.mp4", "--guidance-scale", "inf"], "--guidance-scale: expected a finite number >= 1"),
        (["generate", "a red circle", "-o", "out.mp4", "--guidance-scale", "nan"], "--guidance-scale: expected a finite number >= 1"),
        (["generate", "a red circle", "-o", "out.mp4", "--upscale", "1000"], "--upscale: expected an integer in [1, 32]"),
        (["generate", "a red circle", "-o", "/tmp/x.mp4", "--device", "cuda:7"], "--device 'cuda:7' is not available"),
        (["generate", "a red circle", "-o", "/tmp/x.mp4", "--device", "gpu"], "--device 'gpu' is not a torch device"),
        (["generate", "  ", "-o", "out.mp4"], "the prompt is empty"),
        (["generate", "a red circle"], "required: -o/--output"),
        (["image-to-video", "missing.png", "a red circle", "-o", "out.mp4"], "image 'missing.png' is not a file"),
        (["video-to-video", "missing.mp4", "a red circle", "-o", "out.mp4", "--strength", "2"], "--strength: expected a number in [0, 1]"),
        (["likelihood", "missing.mp4"], "video 'missing.mp4' is not a file"),
        (["paint", "x"], "invalid choice: 'paint'"),
    ],
)
def test_bad_input_fails_with_an_error_naming_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_output_that_is_a_folder_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out.mp4"
    folder.mkdir()
    monkeypatch.setattr("starflow_diffusers.cli.run", lambda args: pytest.fail("sampled before checking --output"))
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red circle", "-o", str(folder)])
    assert exit_info.value.code == 2
    assert f"--output {str(folder)!r} is a folder" in capsys.readouterr().err


def test_pipeline_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["generate", "a red circle", "-o", str(tmp_path / "out.mp4"), "--height", "4"]) == 2
    assert "starflow-v generate: error:" in capsys.readouterr().err


@pytest.mark.parametrize("command, prog", [("convert", "starflow-convert"), ("train-lora", "starflow-train-lora")])
def test_convert_and_train_lora_delegate_to_their_tools(command, prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"usage: {prog}" in capsys.readouterr().out


@pytest.mark.slow
def test_the_console_entry_point_runs_as_a_module(tmp_path):
    out = tmp_path / "out.mp4"
    subprocess.run([sys.executable, "-m", "starflow_diffusers.cli", "generate", SPEC.caption, "-o", str(out)], check=True)
    assert _read_mp4(out)[1].shape == (17, 256, 256, 3)


# `--help` and argument errors must not wait for torch and diffusers (seconds to import): the package and
# every entry point import them only once work starts.
NO_TORCH_CHECK = """
import sys
from {module} import main
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
heavy = sorted(name for name in ("torch", "diffusers", "transformers", "peft", "accelerate") if name in sys.modules)
print("imported:", heavy, "exit:", code)
"""


@pytest.mark.parametrize(
    "module, argv",
    [
        ("starflow_diffusers.cli", ["--help"]),
        ("starflow_diffusers.cli", ["generate", "--help"]),
        ("starflow_diffusers.cli", ["generate", "a red circle", "-o", "out.avi"]),
        ("starflow_diffusers.cli", ["train-lora", "--help"]),
        ("starflow_diffusers.conversion.__main__", ["--help"]),
        ("starflow_diffusers.conversion.__main__", ["--checkpoint", "a.pth"]),
        ("starflow_diffusers.training.train_lora", ["--help"]),
        ("starflow_diffusers.training.train", ["--help"]),
    ],
)
def test_help_and_argument_errors_import_no_torch(module, argv):
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_CHECK.format(module=module, argv=argv)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    heavy, code = result.stdout.strip().splitlines()[-1].split("exit:")
    assert heavy.strip() == "imported: []" and code.strip() in ("0", "2"), result.stdout + result.stderr


def test_the_package_resolves_every_component_by_name():
    # diffusers' from_pretrained looks classes up with getattr on the package named in model_index.json
    import starflow_diffusers

    for name in starflow_diffusers.__all__:
        assert getattr(starflow_diffusers, name) is not None
    with pytest.raises(AttributeError, match="NoSuchClass"):
        starflow_diffusers.NoSuchClass
