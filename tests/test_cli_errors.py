"""`diffattn generate` on bad input, hub ids and its outputs: every bad setting is one line on stderr naming the flag
with exit status 2 (no traceback, nothing written); Ctrl-C is one line and exit 130 with nothing left behind; hub ids
load through `from_pretrained` (mocked at that boundary: no hub here); outputs are written atomically, never over
an existing file without --overwrite, each with its own valid-JSON sidecar recording what really ran."""

from __future__ import annotations

import json
import os
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

from diffattn.cli import main

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    import tiny_pipelines as tp

    path = tmp_path_factory.mktemp("wan")
    tp.build_tiny_wan_pipeline(str(path))
    return str(path)


def _gen(folder, out, *extra):
    return ["generate", "--model", folder, "--prompt", PROMPT, "--steps", "2", "--height", "32", "--width", "32",
            "--frames", "5", "--max-sequence-length", "16", "--device", "cpu", "--out", str(out), *extra]


def _with(args: list[str], extra: list[str]) -> list[str]:
    """`args` with each flag of `extra` replaced when `args` has it, else added."""
    args = list(args)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("diffattn")]
    assert len(ours) == 1 and err.rstrip("\n").endswith(ours[0]) and "Traceback" not in err, err
    for word in words:
        assert word in ours[0], err
    return ours[0]


def _interrupted(capsys) -> None:
    """Ctrl-C: the last stderr line says so (progress lines may come before it), no traceback."""
    err = capsys.readouterr().err
    assert err.rstrip("\n").splitlines()[-1] == "diffattn generate: interrupted" and "Traceback" not in err, err


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message is for CPU machines")


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--steps", "0"], ["--steps must be an integer >= 1", "got 0"]),
        (["--steps", "-3"], ["--steps must be an integer >= 1"]),
        (["--frames", "0"], ["--frames must be an integer >= 1", "got 0"]),
        (["--height", "0"], ["--height must be an integer >= 1"]),
        (["--width", "-16"], ["--width must be an integer >= 1"]),
        (["--height", "40"], ["--height 40 is not a multiple of 16", "WanPipeline", "32 or 48"]),
        (["--max-sequence-length", "0"], ["--max-sequence-length must be an integer >= 1"]),
        (["--fps", "0"], ["--fps must be an integer >= 1"]),
        (["--guidance", "inf"], ["--guidance must be a finite number", "inf"]),
        (["--guidance", "nan"], ["--guidance must be a finite number", "nan"]),
        (["--seed", "-1"], ["--seed must be an integer from 0"]),
        (["--prompt", ""], ["--prompt is empty"]),
        (["--prompt", "   "], ["--prompt is empty"]),
        (["--device", "bogus"], ["--device 'bogus' is not a device name", "cpu, cuda"]),
        pytest.param(["--device", "cuda"], ["--device cuda: no CUDA GPU is available here"], marks=NO_GPU),
        pytest.param(["--device", "cuda:3"], ["--device cuda:3: no CUDA GPU is available here"], marks=NO_GPU),
        (["--model", "/etc/passwd"], ["model '/etc/passwd' is a file, not a Diffusers pipeline folder"]),
        (["--model", "/etc"], ["model '/etc' is a folder without model_index.json"]),
        (["--model", "./no/such/folder"], ["model folder './no/such/folder' does not exist", "org/name"]),
        (["--model", ""], ["model is empty"]),
        (["--attn", "radial", "--attn-opt", "dense_last_steps=1.5"], ["'dense_last_steps'"]),
        (["--out", "clip.txt"], ["unknown output suffix"]),
    ],
)
def test_bad_settings_are_one_line_exit_2_and_write_nothing(wan_folder, tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.chdir(tmp_path)
    assert main(_with(_gen(wan_folder, tmp_path / "clip.gif"), extra)) == 2
    _one_line_error(capsys, *words)
    assert _leftovers(tmp_path) == []


def test_settings_are_checked_before_the_model_loads(wan_folder, tmp_path, capsys, monkeypatch):
    import diffattn.generate

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(diffattn.generate, "load_pipeline", no_load)
    for extra in (["--steps", "0"], ["--fps", "0"], ["--guidance", "inf"], ["--device", "bogus"], ["--prompt", ""]):
        assert main(_with(_gen(wan_folder, tmp_path / "x.mp4"), extra)) == 2
        _one_line_error(capsys, extra[0])


def test_frames_rounded_with_a_notice_and_the_true_value_recorded(wan_folder, tmp_path, capsys, caplog):
    out = tmp_path / "clip.gif"
    with caplog.at_level("WARNING", logger="diffattn"):
        assert main(_gen(wan_folder, out, "--frames", "7")) == 0, capsys.readouterr().err
    assert iio.imread(out).shape[0] == 5
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["frames"] == 5 and meta["requested"] == {"frames": 7} and meta["output"]["frames"] == 5
    assert any("--frames 7 is not 4k+1" in n and "generating 5 frames" in n for n in meta["notices"]), meta["notices"]
    assert any("--frames 7 is not 4k+1" in r.getMessage() for r in caplog.records)


def test_method_that_will_not_run_gives_a_notice_and_effective_options(wan_folder, tmp_path, capsys, caplog):
    out = tmp_path / "radial.gif"
    with caplog.at_level("WARNING", logger="diffattn"):
        # 2 steps, all inside radial's default 12-step dense warm-up on Wan
        assert main(_gen(wan_folder, out, "--attn", "radial", "--attn-opt", "block_size=16")) == 0
    meta = json.loads(Path(f"{out}.json").read_text())
    assert any(n.startswith("radial: all 2 steps run dense (dense_timesteps=12") for n in meta["notices"]), meta
    assert any("radial: all 2 steps run dense" in r.getMessage() for r in caplog.records)
    # the effective options: Wan's family defaults filled in, as the method object reports them
    from diffattn.methods.radial import FAMILY_DEFAULTS

    eff = meta["attn_effective_options"]
    assert eff["block_size"] == 16 and eff["dense_last_steps"] == 0
    assert {k: eff[k] for k in FAMILY_DEFAULTS["wan"]} == FAMILY_DEFAULTS["wan"]
    # a setting where it does run sparse: no notice about steps
    out2 = tmp_path / "radial2.gif"
    assert main(_gen(wan_folder, out2, "--attn", "radial", "--attn-opt", "dense_timesteps=1", "--attn-opt",
                     "block_size=16", "--height", "64", "--width", "64", "--frames", "9")) == 0
    meta2 = json.loads(Path(f"{out2}.json").read_text())
    assert not any("steps run dense" in n for n in meta2["notices"]), meta2["notices"]
    assert meta2["attn_effective_options"]["dense_timesteps"] == 1


def test_gna_window_covering_the_grid_gives_a_notice(wan_folder, tmp_path, capsys):
    out = tmp_path / "gna.gif"
    assert main(_gen(wan_folder, out, "--attn", "gna", "--attn-opt", "kernel_size=-1")) == 0, capsys.readouterr().err
    meta = json.loads(Path(f"{out}.json").read_text())
    assert any("gna: the window" in n and "covers the whole" in n for n in meta["notices"]), meta["notices"]


# ---- outputs ---------------------------------------------------------------------------------------------------
def test_existing_output_is_not_overwritten_without_overwrite(wan_folder, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    out.write_bytes(b"precious")
    assert main(_gen(wan_folder, out)) == 2
    _one_line_error(capsys, f"{out} exists", "--overwrite")
    assert out.read_bytes() == b"precious" and _leftovers(tmp_path) == ["clip.gif"]
    # a sidecar alone is protected too
    out.unlink()
    Path(f"{out}.json").write_text("{}")
    assert main(_gen(wan_folder, out)) == 2
    _one_line_error(capsys, f"{out}.json exists")
    assert not out.exists()
    # with --overwrite both are replaced
    assert main(_gen(wan_folder, out, "--overwrite")) == 0
    assert iio.imread(out).shape[0] == 5 and json.loads(Path(f"{out}.json").read_text())["output"]["frames"] == 5
    assert _leftovers(tmp_path) == ["clip.gif", "clip.gif.json"]


def test_gif_and_mp4_of_one_stem_have_their_own_sidecars(wan_folder, tmp_path, capsys):
    gif, mp4 = tmp_path / "x.gif", tmp_path / "x.mp4"
    assert main(_gen(wan_folder, gif, "--seed", "1")) == 0
    assert main(_gen(wan_folder, mp4, "--seed", "2")) == 0
    assert json.loads(Path(f"{gif}.json").read_text())["seed"] == 1
    assert json.loads(Path(f"{mp4}.json").read_text())["seed"] == 2
    assert _leftovers(tmp_path) == ["x.gif", "x.gif.json", "x.mp4", "x.mp4.json"]


def test_sidecar_is_strict_json(tmp_path):
    from diffattn.generate import write_sidecar

    path = write_sidecar(str(tmp_path / "a.png"), {"guidance": float("inf"), "x": float("nan"), "t": (1, 2)},
                         {"kind": "image"}, 0.5)
    text = Path(path).read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert record["guidance"] == "inf" and record["x"] == "nan" and record["t"] == [1, 2]


def test_interrupted_write_leaves_no_partial_file(wan_folder, tmp_path, capsys, monkeypatch):
    import imageio.v3

    real = imageio.v3.imwrite

    def half_then_interrupt(path, data, **kwargs):
        real(path, data[:1], **kwargs)  # a truncated file on disk, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio.v3, "imwrite", half_then_interrupt)
    out = tmp_path / "clip.gif"
    assert main(_gen(wan_folder, out)) == 130
    _interrupted(capsys)
    assert _leftovers(tmp_path) == []


def test_ctrl_c_during_generation_or_before_the_sidecar(wan_folder, tmp_path, capsys, monkeypatch):
    import diffattn.generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "clip.gif"
    with monkeypatch.context() as m:
        m.setattr(diffattn.generate, "run_generation", interrupted)
        assert main(_gen(wan_folder, out)) == 130
        _interrupted(capsys)
    assert _leftovers(tmp_path) == []
    # after the result, before its sidecar: the result without a sidecar is not left behind
    with monkeypatch.context() as m:
        m.setattr(diffattn.generate, "write_sidecar", interrupted)
        assert main(_gen(wan_folder, out)) == 130
        _interrupted(capsys)
    assert _leftovers(tmp_path) == []


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    from diffattn.generate import atomic_path

    target = tmp_path / "a.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            Path(tmp).write_bytes(b"new, half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == ["a.png"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_path(str(target), overwrite=False) as tmp:
            Path(tmp).write_bytes(b"new")
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == ["a.png"]


# ---- hub ids ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(wan_folder, monkeypatch):
    """`DiffusionPipeline.from_pretrained` for a hub id, mocked at that boundary: records the id and loads the
    tiny Wan pipeline from its folder (what a download would give)."""
    from diffusers import DiffusionPipeline, WanPipeline

    calls = []
    real = DiffusionPipeline.from_pretrained.__func__  # WanPipeline inherits the patched one

    def from_pretrained(name, **kwargs):
        if os.path.isdir(name):  # a local folder: the real loader, not a hub call
            return real(DiffusionPipeline, name, **kwargs)
        calls.append((name, kwargs))
        if name != "tiny-org/tiny-wan":
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                          "has been disabled.")
        return real(WanPipeline, wan_folder, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", staticmethod(from_pretrained))
    return calls


def test_hub_id_loads_through_from_pretrained(fake_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    out = tmp_path / "hub.gif"
    assert main(_gen("tiny-org/tiny-wan", out)) == 0, capsys.readouterr().err
    assert [name for name, _ in fake_hub] == ["tiny-org/tiny-wan"]
    assert fake_hub[0][1]["dtype"] == torch.float32
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["model"] == "tiny-org/tiny-wan" and meta["pipeline"] == "WanPipeline"


def test_hub_id_offline_is_one_line(fake_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(_gen("some-org/not-cached", tmp_path / "x.gif")) == 2
    _one_line_error(capsys, "could not load hub model 'some-org/not-cached'", "HF_HUB_OFFLINE",
                    "huggingface-cli download some-org/not-cached")


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(fake_hub, wan_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org").mkdir()
    os.symlink(wan_folder, tmp_path / "tiny-org" / "local-wan")
    out = tmp_path / "local.gif"
    assert main(_gen("tiny-org/local-wan", out)) == 0, capsys.readouterr().err
    assert fake_hub == []  # never asked the hub


def test_model_source_rules(tmp_path):
    from diffattn.generate import model_source

    assert model_source("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == "hub"
    for bad in ("../x/y", "a/b/c", "no-slash-name", "/abs/missing"):
        with pytest.raises(ValueError, match="does not exist"):
            model_source(str(bad))


@pytest.mark.parametrize("mode", ["--highres", "--long"])
def test_render_refuses_an_existing_output_and_bad_settings_before_loading(tmp_path, capsys, mode):
    """`diffattn render` shares generate's rules: an existing output is never replaced without --overwrite, and a bad
    setting is a one-line error, both before any model is loaded (the model folder here does not even exist)."""
    out = tmp_path / "clip.gif"
    out.write_bytes(b"precious")
    base = ["render", mode, "--model", str(tmp_path / "no-model-here"), "--prompt", "a fox", "--device", "cpu",
            "--dtype", "fp32", "--out", str(out)]
    assert main(base) == 2
    _one_line_error(capsys, f"{out} exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    assert main([*base, "--overwrite", "--fps", "0"]) == 2
    _one_line_error(capsys, "--fps must be an integer >= 1")
