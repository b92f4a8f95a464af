"""The typed model description: flags → ModelSpec → model, and the record an index keeps of its model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from clip2video.cli import infer_retrieval
from clip2video.cli.common import UsageError, model_spec, parse_with_config
from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.weights import factory
from clip2video.modules.weights.identity import (
    ModelMismatchError,
    ModelRecord,
    describe_model,
    load_recorded,
    model_fingerprint,
)
from clip2video.modules.weights.release import export_original
from clip2video.modules.weights.spec import ModelSpec, ModelSpecError, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def eval_args(*argv: str):
    return parse_with_config(infer_retrieval.build_parser(), list(argv))


def test_flags_become_a_spec(tiny_ckpt):
    args = eval_args("--checkpoint", str(tiny_ckpt.parent), "--model_num", "1", "--sim_type", "seqTransf",
                     "--temporal_type", "TDB", "--temporal_proj", "sigmoid_selfA", "--center_type", "TAB",
                     "--center_proj", "TAB_TDB", "--centerK", "3", "--max_words", "16", "--seed", "7")
    spec = model_spec(args)
    assert spec == ModelSpec(checkpoint=str(tiny_ckpt.parent), model_num="1", variant="tab_tdb",
                             sim_type="seqTransf", temporal_type="TDB", temporal_proj="sigmoid_selfA",
                             center_type="TAB", center_proj="TAB_TDB", center_k=3, prefer_stored=False, max_words=16,
                             seed=7)
    assert spec == ModelSpec.of_flags(checkpoint=str(tiny_ckpt.parent), model_num="1", sim_type="seqTransf",
                                      temporal_type="TDB", temporal_proj="sigmoid_selfA", center_type="TAB",
                                      center_proj="TAB_TDB", center_k=3, prefer_stored=False, max_words=16, seed=7)
    # without model flags a checkpoint's stored config wins; --variant names a row; --init_model is --checkpoint
    spec = model_spec(eval_args("--init_model", str(tiny_ckpt), "--variant", "tdb"))
    assert spec.checkpoint == str(tiny_ckpt) and spec.variant == "tdb" and spec.temporal_proj == "sigmoid_selfA"
    assert not spec.prefer_stored and model_spec(eval_args("--checkpoint", "x")).prefer_stored
    assert model_spec(eval_args("--checkpoint", "x"), if_given=True) is not None
    assert model_spec(eval_args("--max_words", "8"), if_given=True) is None  # no model flag at all
    with pytest.raises(UsageError, match="--checkpoint is required"):
        model_spec(eval_args())
    with pytest.raises(UsageError, match="--zero_shot needs --clip_path"):
        model_spec(eval_args("--zero_shot"))
    with pytest.raises(ModelSpecError, match="unknown variant"):
        ModelSpec.of_variant("tab_tbd")


def test_load_model_of_a_released_file_uses_the_spec_fields_and_the_original_layout(tmp_path):
    torch.manual_seed(0)
    model = factory.create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=3)
    path = tmp_path / "pytorch_model.bin.1"
    torch.save(model.state_dict(), path)  # as released: a plain state dict, no stored config
    spec = ModelSpec.of_variant("tab_tdb", checkpoint=str(tmp_path), model_num="1", center_k=3)
    loaded = load_model(spec)
    assert loaded.config.mask_layout == "original" and loaded.config.center_k == 3
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert load_model(replace(spec, mask_layout="per_video")).config.mask_layout == "per_video"
    with pytest.raises(ValueError, match="shape mismatch"):  # a centerK that does not fit the weights
        load_model(replace(spec, center_k=5))


def test_stored_config_wins_unless_the_spec_was_given(tmp_path):
    torch.manual_seed(0)
    model = factory.create_model("tdb", clip_config=ClipConfig.tiny())
    path = export_original(model, tmp_path / "pytorch_model.bin.0")
    stored = load_model(ModelSpec.of_variant("tab_tdb", checkpoint=str(path)))  # prefer_stored: the file says tdb
    assert stored.config.variant == "tdb" and model_fingerprint(stored) == model_fingerprint(model)
    with pytest.raises(ValueError, match="unexpected keys|missing keys"):  # the user's tab_tdb: not these weights
        load_model(ModelSpec.of_variant("tab_tdb", checkpoint=str(path), prefer_stored=False))


def test_zero_shot_spec_is_seeded(tmp_path):
    clip = factory.create_model("meanP", clip_config=ClipConfig.tiny()).clip
    sd = dict(clip.state_dict(), input_resolution=torch.tensor(ClipConfig.tiny().image_size),
              context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(sd, tmp_path / "clip.pt")
    spec = ModelSpec.of_variant("tab_tdb", zero_shot=True, clip_path=str(tmp_path / "clip.pt"), center_k=3, seed=5)
    a, b = load_model(spec), load_model(spec)
    assert model_fingerprint(a) == model_fingerprint(b)  # TAB centres come from the seed, not from CLIP
    assert model_fingerprint(load_model(replace(spec, seed=6))) != model_fingerprint(a)
    record = describe_model(a, spec)
    assert record.zero_shot and record.checkpoint is None and record.seed == 5
    assert model_fingerprint(load_recorded(record, device="cpu")) == record.fingerprint


def test_record_round_trip_rebuild_and_mismatch(tiny_ckpt, tmp_path):
    spec = ModelSpec.of_variant("tab_tdb", checkpoint=str(tiny_ckpt.parent), model_num="1", center_k=3,
                                mask_layout="per_video", max_words=16)
    model = load_model(spec)
    record = describe_model(model, spec)
    assert record.checkpoint == str(tiny_ckpt.resolve()) and record.max_words == 16 and record.dim > record.global_dim
    assert record.fingerprint == model_fingerprint(model)
    stored = json.loads(json.dumps(dict(record.to_dict(), features_path="/videos")))  # as a manifest holds it
    back = ModelRecord.from_dict(stored)
    assert json.loads(json.dumps(back.to_dict())) == stored  # nothing lost or added in the round trip
    assert back.fingerprint == record.fingerprint and back.dim == record.dim and back.config["center_k"] == 3
    assert back.extra == {"features_path": "/videos"} and back.to_dict()["features_path"] == "/videos"
    rebuilt = load_recorded(back, device="cpu")
    assert model_fingerprint(rebuilt) == record.fingerprint and rebuilt.config.mask_layout == "per_video"
    # other weights under the recorded path are refused
    torch.manual_seed(1)
    other = factory.create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=3)
    moved = export_original(other, tmp_path / "pytorch_model.bin.1")
    with pytest.raises(ModelMismatchError, match="fingerprint differs"):
        load_recorded(ModelRecord.from_dict(dict(stored, checkpoint=str(moved))))
    with pytest.raises(ValueError, match="records no model file"):
        load_recorded(ModelRecord.from_dict({"fingerprint": "x", "dim": 8}))
    # a record from vectors made elsewhere: defaults for what it lacks
    bare = ModelRecord.from_dict({"dim": 8, "logit_scale": None})
    assert bare.logit_scale == 1.0 and bare.center_weight == 0.5 and not bare.loadable
