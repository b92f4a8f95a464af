"""Flags that several commands share are declared once: the data flags of training, evaluation and index
building agree, and every default frame rate is the decoder's one constant."""

from __future__ import annotations

import argparse
import inspect

import pytest

from clip2video.cli import common, infer_retrieval, sample_frame, search, train
from clip2video.dataloaders.video_io import DEFAULT_VIDEO_FPS


def actions(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.option_strings}


def parsers() -> dict[str, argparse.ArgumentParser]:
    sub = search.build_parser()._subparsers._group_actions[0].choices
    return {"train": train.build_parser(), "infer_retrieval": infer_retrieval.build_parser(),
            "search build": sub["build"]}


DATA_FLAGS = sorted(common._data_flags())
# a command's own flag of the same name: search build's --batch_size_val is an alias of its --batch_size
OWN = {("search build", "batch_size_val")}


def test_each_command_takes_the_data_flags_it_reads():
    got = {name: set(actions(p)) & set(DATA_FLAGS) for name, p in parsers().items()}
    assert set(train.TRAIN_DATA_FLAGS) <= got["train"]
    assert set(infer_retrieval.EVAL_DATA_FLAGS) <= got["infer_retrieval"]
    shared = {"features_path", "video_fps", "max_words", "max_frames", "feature_framerate", "image_mode",
              "num_thread_reader"}
    assert all(shared <= flags for flags in got.values()), got


@pytest.mark.parametrize("flag", DATA_FLAGS)
def test_a_data_flag_has_one_type_default_and_choices_in_every_command(flag):
    seen = {name: actions(p)[flag] for name, p in parsers().items() if flag in actions(p) and (name, flag) not in OWN}
    assert seen, f"no command takes --{flag}"
    spec = common._data_flags()[flag]
    for name, a in seen.items():
        assert a.option_strings == [f"--{flag}"], name
        if "default" in spec:
            assert a.default == spec["default"], (name, a.default)
        if "type" in spec:
            assert a.type is spec["type"], name
        first = next(iter(seen.values()))
        assert (type(a), a.type, a.default, a.choices) == (type(first), first.type, first.default, first.choices), (
            flag, name)


def test_unknown_data_flag_is_a_programming_error():
    with pytest.raises(ValueError, match="no data flag nope"):
        common.add_data_args(argparse.ArgumentParser(), ["nope"])


def test_every_frame_rate_default_is_the_decoders_constant():
    from clip2video.dataloaders import dataset, frames

    for name, p in parsers().items():
        assert actions(p)["video_fps"].default == DEFAULT_VIDEO_FPS, name
    extract = actions(sample_frame.build_parser())["fps"]
    assert float(extract.default) == DEFAULT_VIDEO_FPS and f"default {DEFAULT_VIDEO_FPS:g}" in extract.help
    for fn, arg in ((frames.load_video_file, "fps"), (frames.check_video_file, "fps"),
                    (sample_frame.extract_video, "fps"), (dataset.VideoDataset, "video_fps"),
                    (dataset.PairDataset, "video_fps")):
        assert inspect.signature(fn).parameters[arg].default == DEFAULT_VIDEO_FPS, fn.__qualname__


def test_help_states_the_default_frame_rate(capsys):
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--help"])
    assert f"default {DEFAULT_VIDEO_FPS:g})" in capsys.readouterr().out.replace("\n", " ")
