"""Any CLIP ViT backbone, from every weight format, against open_clip's own model (tiny random models).

Families are B/32-, B/16-, L/14- and L/14@336-shaped at small width (B: embedding 64, image tower 128 wide;
L: embedding 128, image tower 192 wide, so the temporal heads change width and head count), each with GELU
and QuickGELU, registered as open_clip architectures (``c2vtest-ViT-*``) so that open_clip builds the
reference model from the same config. No weights are downloaded.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch import nn

from clip2video.modules.network.backbone import OPENAI_MEAN, ClipConfig, QuickGELU, frame_features
from clip2video.modules.network.model import make_config
from clip2video.modules.weights.checkpoint import CheckpointError
from clip2video.modules.weights.clip_weights import load_clip, open_clip_config, unsupported_in_config
from clip2video.modules.weights.factory import create_model, load_model

from conftest import make_colour_clips

FAMILIES = {  # name: (embed/text width, image-tower width, patch, resolution)
    "B-32": (64, 128, 32, 224),
    "B-16": (64, 128, 16, 224),
    "L-14": (128, 192, 14, 224),
    "L-14-336": (128, 192, 14, 336),
}
CAPTIONS = [[49406, 320, 1125, 49407], [49406, 320, 1125, 539, 8001, 533, 49407]]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models on a shared machine: intra-op threads only add contention
    yield
    torch.set_num_threads(threads)


def arch(family: str, quick: bool) -> str:
    return f"c2vtest-ViT-{family}" + ("-quickgelu" if quick else "")


def arch_config(family: str, quick: bool) -> dict:
    dim, width, patch, size = FAMILIES[family]
    cfg = {"embed_dim": dim, "vision_cfg": {"image_size": size, "layers": 2, "width": width, "patch_size": patch},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": dim, "heads": dim // 64, "layers": 2}}
    return {**cfg, "quick_gelu": True} if quick else cfg


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for family in FAMILIES:
        for quick in (False, True):
            (folder / f"{arch(family, quick)}.json").write_text(json.dumps(arch_config(family, quick)))
    open_clip.add_model_config(folder)
    return folder


def reference(family: str, quick: bool, seed: int = 0) -> nn.Module:
    """open_clip's own model, random weights with non-trivial LayerNorms and biases."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(arch(family, quick), pretrained=None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


class _Holder(nn.Module):
    """Module tree that only carries tensors under their state-dict names (a TorchScript archive like
    OpenAI's, without code)."""


def save_torchscript(sd: dict[str, torch.Tensor], path: Path) -> None:
    root = _Holder()
    for key, t in sd.items():
        *mods, leaf = key.split(".")
        m = root
        for name in mods:
            if name not in m._modules:
                m.add_module(name, _Holder())
            m = m._modules[name]
        if t.is_floating_point():
            m.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
        else:
            m.register_buffer(leaf, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(root).save(str(path))


def openai_extras(model: nn.Module) -> dict[str, torch.Tensor]:
    size = model.visual.conv1.weight.shape[-1] * model.visual.grid_size[0]
    return {"input_resolution": torch.tensor(size), "context_length": torch.tensor(77),
            "vocab_size": torch.tensor(49408)}


def write(fmt: str, model: nn.Module, folder: Path, family: str, quick: bool) -> tuple[Path, str | None]:
    """Write ``model`` in format ``fmt``: (weight file, the --clip_model it needs or None)."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if fmt == "openai_torchscript":  # OpenAI releases hold fp16 weights plus three integer buffers
        half = {k: v.half() if v.is_floating_point() and k != "logit_scale" else v for k, v in sd.items()}
        path = folder / "ViT-test.pt"
        save_torchscript({**half, **openai_extras(model)}, path)
        return path, None
    if fmt == "openai_state_dict":
        path = folder / "clip.pt"
        torch.save({**sd, **openai_extras(model)}, path)
        return path, None
    if fmt == "open_clip_bin_with_config":  # as open_clip publishes on the Hugging Face Hub
        path = folder / "open_clip_pytorch_model.bin"
        torch.save(sd, path)
        published = {"model_cfg": arch_config(family, quick),
                     "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
        (folder / "open_clip_config.json").write_text(json.dumps(published))
        return path, None
    if fmt == "open_clip_bin":
        path = folder / "open_clip_pytorch_model.bin"
        torch.save(sd, path)
        return path, arch(family, quick)
    if fmt == "open_clip_safetensors":
        from safetensors.torch import save_file

        path = folder / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path, arch(family, quick)
    if fmt == "open_clip_training":  # open_clip's train.py under DDP
        path = folder / "epoch_1.pt"
        torch.save({"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
        return path, arch(family, quick)
    if fmt == "open_clip_custom_text":  # open_clip's custom-text class around a CLIP text tower
        text = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")
        path = folder / "custom_text.bin"
        torch.save({("text." + k if k.startswith(text) else k): v for k, v in sd.items()}, path)
        return path, arch(family, quick)
    raise ValueError(fmt)


OPENAI_FORMATS = ("openai_torchscript", "openai_state_dict")
OPEN_CLIP_FORMATS = ("open_clip_bin_with_config", "open_clip_bin", "open_clip_safetensors", "open_clip_training",
                     "open_clip_custom_text")
FORMATS = OPENAI_FORMATS + OPEN_CLIP_FORMATS


def activation_of(fmt: str, family: str) -> bool:
    """QuickGELU for OpenAI files; open_clip files: GELU, except the B/32 family (``-quickgelu`` names)."""
    return fmt in OPENAI_FORMATS or family == "B-32"


def frames_and_ids(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, size, size, generator=g)
    ids = torch.zeros(2, 77, dtype=torch.long)
    for i, c in enumerate(CAPTIONS):
        ids[i, : len(c)] = torch.tensor(c)
    return images, ids


def reference_with_file_weights(ref: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    """open_clip's model carrying exactly the (possibly fp16-rounded) tensors our loader read."""
    ref.load_state_dict(sd, strict=True)
    return ref


# ----------------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_open_clips_features(fmt, family, tmp_path, caplog):
    quick = activation_of(fmt, family)
    ref = reference(family, quick)
    path, name = write(fmt, ref, tmp_path, family, quick)
    with caplog.at_level(logging.INFO, logger="clip2video"):
        sd, cfg = load_clip(path, name)
    assert cfg.activation == ("quick_gelu" if quick else "gelu")
    assert cfg.model_name == arch(family, quick)  # given, or inferred from the tensors (and logged)
    assert f"architecture {arch(family, quick)}" in caplog.text
    dim, width, patch, size = FAMILIES[family]
    assert (cfg.embed_dim, cfg.vision_width, cfg.patch_size, cfg.image_size) == (dim, width, patch, size)
    expected_norm = (0.5, 0.5, 0.5) if fmt == "open_clip_bin_with_config" else OPENAI_MEAN
    assert cfg.image_mean == expected_norm

    model = create_model(make_config("tab_tdb", cfg), clip_state_dict=sd).eval()
    ref = reference_with_file_weights(ref, sd)
    images, ids = frames_and_ids(size)
    with torch.no_grad():
        ours_img = frame_features(model.clip, images)
        ours_txt = model.text_tokens(ids[:, :32])[torch.arange(2), ids[:, :32].argmax(-1)]
        ref_img, ref_txt = ref.encode_image(images), ref.encode_text(ids)
    assert (ours_img - ref_img).abs().max() <= 1e-5
    assert (ours_txt - ref_txt).abs().max() <= 1e-5
    # the heads are as wide as the embedding, with the text blocks' head count and the backbone's activation
    head = model.transformerClip.resblocks[0]
    assert head.attn.embed_dim == dim and head.attn.num_heads == max(1, dim // 64)
    assert model.frame_position_embeddings.weight.shape == (77, dim)
    assert isinstance(head.mlp.gelu, QuickGELU if quick else nn.GELU)


def test_open_clip_b16_features_within_1e5_of_open_clip(tmp_path):
    """The acceptance pair spelled out: OpenAI-layout B/16 state dict and open_clip B/16 checkpoint."""
    for fmt, quick in (("openai_state_dict", True), ("open_clip_safetensors", False)):
        ref = reference("B-16", quick, seed=3)
        path, name = write(fmt, ref, tmp_path / fmt, "B-16", quick)
        sd, cfg = load_clip(path, name)
        model = create_model(make_config("meanP", cfg), clip_state_dict=sd).eval()
        images, ids = frames_and_ids(224)
        with torch.no_grad():
            emb = model.encode_text(ids[:, :32], (ids[:, :32] > 0).long()).global_
            want = ref.encode_text(ids, normalize=True)
            assert (emb - want).abs().max() <= 1e-5
            assert (frame_features(model.clip, images) - ref.encode_image(images)).abs().max() <= 1e-5
        # the other activation is measurably wrong, which is why it must never be picked silently
        wrong = create_model(make_config("meanP", ClipConfig.from_dict(
            {**cfg.to_dict(), "activation": "gelu" if quick else "quick_gelu"})), clip_state_dict=sd).eval()
        with torch.no_grad():
            assert (frame_features(wrong.clip, images) - ref.encode_image(images)).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------- errors
def test_activation_mismatch_and_ambiguity_are_errors(tmp_path):
    ref = reference("B-16", True)
    jit, _ = write("openai_torchscript", ref, tmp_path / "a", "B-16", True)
    with pytest.raises(CheckpointError, match="activation mismatch.*OpenAI release: QuickGELU.*GELU"):
        load_clip(jit, arch("B-16", False))
    assert load_clip(jit, arch("B-16", True))[1].activation == "quick_gelu"
    published, _ = write("open_clip_bin_with_config", reference("B-16", False), tmp_path / "b", "B-16", False)
    with pytest.raises(CheckpointError, match="activation mismatch"):
        load_clip(published, arch("B-16", True))
    plain, _ = write("open_clip_bin", reference("B-16", False), tmp_path / "c", "B-16", False)
    with pytest.raises(CheckpointError, match=r"QuickGELU or GELU.*--clip_model.*c2vtest-ViT-B-16 \(GELU\)"):
        load_clip(plain)
    with pytest.raises(CheckpointError, match="do not have the shapes of --clip_model c2vtest-ViT-L-14"):
        load_clip(plain, arch("L-14", False))
    with pytest.raises(CheckpointError, match="no architecture 'ViT-Q-99'"):
        load_clip(plain, "ViT-Q-99")
    with pytest.raises(CheckpointError, match="no pretrained tag 'nope'"):
        load_clip(plain, "ViT-B-16:nope")


@pytest.mark.parametrize("name, what", [
    ("ViT-B-16-SigLIP", "timm image tower"),
    ("ViT-SO400M-14-SigLIP", "timm image tower"),
    ("xlm-roberta-base-ViT-B-32", "Hugging Face text tower"),
    ("ViT-H-14-worldwide", "tokenizer"),
    ("ViT-L-14-CLIPA", "tokenizer"),
    ("convnext_base", "timm image tower"),
    ("RN50", "ResNet image tower"),
    ("coca_ViT-B-32", "CoCa"),
    ("ViT-M-16-alt", "ls_init_value"),
])
def test_non_clip_style_models_are_named(name, what):
    cfg, _ = open_clip_config(name)
    assert what in unsupported_in_config(cfg)


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-B-32-quickgelu",
                                  "ViT-H-14", "ViT-g-14", "ViT-bigG-14", "ViT-B-16-plus-240"])
def test_clip_style_open_clip_architectures_are_supported(name):
    assert unsupported_in_config(open_clip_config(name)[0]) is None


def test_catalogue_reads_open_clip_through_its_public_listing():
    """Every architecture open_clip lists, including those registered with ``add_model_config``, minus the
    non-CLIP-style ones; shapes as open_clip builds them."""
    from clip2video.modules.weights.clip_weights import _catalogue, matching_architectures

    cat = {name: (quick, shapes) for name, quick, shapes in _catalogue()}
    assert set(cat) <= set(open_clip.list_models())
    assert {"ViT-B-32", "ViT-B-32-quickgelu", arch("B-16", False), arch("B-16", True)} <= set(cat)
    assert not {"RN50", "coca_ViT-B-32"} & set(cat)
    assert cat["ViT-B-32-quickgelu"][0] and not cat["ViT-B-32"][0]
    assert ("ViT-B-32", False) in matching_architectures(ClipConfig.vit_b_32())
    tiny_b16 = ClipConfig.from_state_dict(reference("B-16", True).state_dict())
    assert set(matching_architectures(tiny_b16)) == {(arch("B-16", False), False), (arch("B-16", True), True)}


@pytest.mark.parametrize("extra, what", [
    ({"logit_bias": torch.zeros(1)}, "SigLIP"),
    ({"visual.trunk.stem.0.weight": torch.zeros(1)}, "timm image tower"),
    ({"text.transformer.encoder.layer.0.attention.self.query.weight": torch.zeros(1)}, "Hugging Face text tower"),
])
def test_non_clip_style_weight_files_are_one_error(extra, what, tmp_path):
    sd = {**reference("B-32", True).state_dict(), **extra}
    path = tmp_path / "w.bin"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=f"unsupported CLIP: .*{what}") as e:
        load_clip(path, arch("B-32", True))
    assert "\n" not in str(e.value)


def test_multilingual_vocabulary_is_an_unsupported_tokenizer(tmp_path):
    sd = reference("B-32", True).state_dict()
    sd["token_embedding.weight"] = torch.zeros(250002, 64)
    torch.save(sd, tmp_path / "w.bin")
    with pytest.raises(CheckpointError, match="unsupported tokenizer: a 250002-token vocabulary"):
        load_clip(tmp_path / "w.bin", arch("B-32", True))


def test_unsupported_model_through_the_cli_is_one_line_exit_1(tmp_path, capsys):
    from clip2video.cli import infer_retrieval

    csv, feats = make_data(tmp_path)
    path, _ = write("open_clip_bin", reference("B-32", False), tmp_path / "clip", "B-32", False)
    rc = infer_retrieval.main(["--zero_shot", "--clip_path", str(path), "--clip_model", "ViT-B-16-SigLIP",
                               "--features_path", str(feats), "--datatype", "generic", "--data_path", str(csv),
                               "--split", "val", "--num_thread_reader", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "--clip_model ViT-B-16-SigLIP: unsupported CLIP: the timm image tower" in err


# ----------------------------------------------------------------------------------------------- configs
def test_configs_written_before_the_backbone_fields_describe_openai_clip():
    old = {"embed_dim": 512, "image_size": 224, "patch_size": 32, "vision_width": 768, "vision_layers": 12,
           "context_length": 77, "vocab_size": 49408, "text_width": 512, "text_layers": 12}
    cfg = ClipConfig.from_dict(old)
    assert cfg.activation == "quick_gelu" and cfg.image_mean == OPENAI_MEAN and cfg.text_heads == 8
    again = ClipConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg  # lists from JSON become tuples again


def test_mlp_width_other_than_4x_is_read_and_built():
    cfg = ClipConfig(embed_dim=64, image_size=32, patch_size=16, vision_width=96, vision_layers=1,
                     text_width=64, text_layers=1, vision_mlp_width=472, text_mlp_width=0)
    sd = create_model("meanP", clip_config=cfg).clip.state_dict()
    assert sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape == (472, 96)
    assert ClipConfig.from_state_dict(sd) == cfg


def test_frames_reach_the_tower_in_the_backbones_normalisation(tmp_path):
    """Frame readers deliver OpenAI's normalisation; a backbone published with mean = std = 0.5 must see
    (pixels − 0.5) / 0.5, computed here independently from Pillow's own resize."""
    from clip2video.dataloaders.frames import CLIP_MEAN, CLIP_STD, load_video
    from clip2video.dataloaders.resample import resize_crop

    assert CLIP_MEAN == OPENAI_MEAN and CLIP_STD == ClipConfig().image_std  # the data side's one convention
    rng = np.random.default_rng(0)
    folder = tmp_path / "video"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (180, 260, 3), dtype=np.uint8)).save(folder / f"{i + 1:08d}.png")
    ref = reference("B-16", False)
    path, _ = write("open_clip_bin_with_config", ref, tmp_path / "clip", "B-16", False)
    sd, cfg = load_clip(path)
    assert cfg.image_mean == cfg.image_std == (0.5, 0.5, 0.5)
    model = create_model(make_config("meanP", cfg), clip_state_dict=sd).eval()
    frames, mask, names = load_video(folder, max_frames=2, image_size=224)
    pixels = [np.asarray(resize_crop(Image.open(folder / n).convert("RGB"), 224), dtype=np.float32) / 255
              for n in names]
    want_input = (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) - 0.5) / 0.5
    with torch.no_grad():
        ours = model.encode_frames(frames[None], mask[None])[0]
        want = ref.encode_image(want_input)
        openai_normalised = ref.encode_image(frames)
    assert (ours - want).abs().max() <= 1e-5
    assert (openai_normalised - want).abs().max() > 1e-3  # without the conversion the features would differ


# ----------------------------------------------------------------------------------------------- end to end
def make_data(root: Path) -> tuple[Path, Path]:
    return make_colour_clips(root, n_videos=8, frames=3, colours=4, size=(24, 32), noise=40)


# every family with both activations, each from another file format (all formats covered)
END_TO_END = [
    ("B-32", True, "openai_torchscript"), ("B-32", False, "open_clip_training"),
    ("B-16", True, "openai_state_dict"), ("B-16", False, "open_clip_safetensors"),
    ("L-14", True, "open_clip_custom_text"), ("L-14", False, "open_clip_bin_with_config"),
    ("L-14-336", True, "openai_torchscript"), ("L-14-336", False, "open_clip_bin"),
]


@pytest.mark.parametrize("family, quick, fmt", END_TO_END)
def test_train_a_step_evaluate_and_rebuild_without_flags(family, quick, fmt, tmp_path, capsys):
    """train.py from the CLIP file (one step + validation + export), then infer_retrieval.py on the export
    with no backbone flag: the same backbone comes back, and the metrics match the validation's."""
    from clip2video.cli import infer_retrieval, train

    csv, feats = make_data(tmp_path)
    path, name = write(fmt, reference(family, quick), tmp_path / "clip", family, quick)
    out = tmp_path / "run"
    argv = ["--clip_path", str(path), "--datatype", "generic", "--data_path", str(csv), "--features_path",
            str(feats), "--val_split", "val", "--output_dir", str(out), "--batch_size", "2", "--batch_size_val", "4",
            "--epochs", "1", "--max_steps", "1", "--max_frames", "4", "--max_words", "8", "--num_thread_reader",
            "0", "--variant", "tab_tdb", "--cross_num_hidden_layers", "1", "--no_progress"]
    assert train.main(argv + (["--clip_model", name] if name else [])) == 0
    trained = torch.load(out / "latest.pt", map_location="cpu", weights_only=False)["config"]["model"]["clip"]
    assert trained["activation"] == ("quick_gelu" if quick else "gelu")
    assert trained["model_name"] == arch(family, quick) and trained["image_size"] == FAMILIES[family][3]

    model = load_model(out / "pytorch_model.bin.0")  # export + sidecar: no flags at all
    assert model.config.clip == ClipConfig.from_dict(trained)
    assert isinstance(model.actionClip.resblocks[0].mlp.gelu, QuickGELU if quick else nn.GELU)
    metrics, sim = tmp_path / "m.json", tmp_path / "sim.npy"
    assert infer_retrieval.main(["--checkpoint", str(out), "--model_num", "0", "--datatype", "generic",
                                 "--data_path", str(csv), "--split", "val", "--features_path", str(feats),
                                 "--max_frames", "4", "--max_words", "8", "--batch_size_val", "4",
                                 "--num_thread_reader", "0", "--metrics_json", str(metrics),
                                 "--save_sim", str(sim)]) == 0
    act = "QuickGELU" if quick else "GELU"
    assert f"backbone: {arch(family, quick)} ({act}, {FAMILIES[family][3]} px" in capsys.readouterr().out
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r["val"] for r in logged if "val" in r][-1]
    got = json.loads(metrics.read_text())
    for direction in ("t2v", "v2t"):
        for k, v in val[direction].items():
            assert got[direction][k] == pytest.approx(v, abs=1e-6)
    # index the videos with the export (no backbone flag) and query: the evaluation's scores come back
    assert search_scores(out, feats, tmp_path / "ix", capsys) == pytest.approx(np.load(sim), abs=1e-4)


def search_scores(ckpt_dir: Path, feats: Path, ix: Path, capsys, *source: str) -> np.ndarray:
    """search.py build (checkpoint export, or ``source`` flags) + query of the validation captions → the
    (caption × validation video) scores, in infer_retrieval.py's order."""
    from clip2video.cli import search

    source = source or ("--checkpoint", str(ckpt_dir), "--model_num", "0")
    assert search.main(["build", "--features_path", str(feats), "--index", str(ix), *source, "--max_words", "8",
                        "--max_frames", "4", "--num_thread_reader", "0", "--device", "cpu", "--no_progress"]) == 0
    captions = [f"a video that is {c}" for c in ("red", "green", "blue", "yellow")]
    capsys.readouterr()
    assert search.main(["query", "--index", str(ix), "--json", "-k", "8", *captions]) == 0
    results = json.loads(capsys.readouterr().out)
    val_ids = [f"video{v}" for v in range(4, 8)]
    out = np.zeros((4, 4))
    for row, res in enumerate(results):
        scores = {r["video_id"]: r["score"] for r in res["results"]}
        out[row] = [scores[v] for v in val_ids]
    return out


@pytest.mark.parametrize("variant", ["meanP", "tab_tdb"])
def test_zero_shot_index_from_an_open_clip_file_rebuilds_its_backbone(variant, tmp_path, capsys):
    """An index built straight from a GELU open_clip safetensors file records the backbone; querying it
    rebuilds the model from that record and the file's tensors, and gives infer_retrieval's zero-shot scores.
    With TAB the centres are not CLIP's: they come from the seed the index records."""
    from clip2video.cli import infer_retrieval

    csv, feats = make_data(tmp_path)
    path, name = write("open_clip_safetensors", reference("B-16", False), tmp_path / "clip", "B-16", False)
    flags = ["--zero_shot", "--clip_path", str(path), "--clip_model", name, "--variant", variant,
             "--mask_layout", "per_video"]
    sim = tmp_path / "sim.npy"
    assert infer_retrieval.main([*flags, "--datatype", "generic", "--data_path", str(csv), "--split", "val",
                                 "--features_path", str(feats), "--max_frames", "4", "--max_words", "8",
                                 "--batch_size_val", "4", "--num_thread_reader", "0", "--save_sim", str(sim)]) == 0
    got = search_scores(None, feats, tmp_path / "ix", capsys, *flags)
    assert got == pytest.approx(np.load(sim), abs=1e-4)


@pytest.mark.parametrize("name, centres", [("msrvtt_9k_b16", 5), ("vatex_b16", 7), ("msvd_b16", 5)])
def test_b16_configs_extend_their_base(name, centres, tmp_path):
    from clip2video.cli.train import parse_args

    (tmp_path / "f").mkdir()
    root = Path(__file__).resolve().parents[1]
    args = parse_args(["--config", str(root / "configs" / "train" / f"{name}.yaml"), "--tiny_clip",
                       "--features_path", str(tmp_path / "f"), "--output_dir", str(tmp_path / "o")])
    assert (args.batch_size, args.max_frames, args.max_words, args.centerK) == (128, 12, 32, centres)
    assert args.grad_checkpointing and args.variant == "tab_tdb"


def test_checkpoint_backbone_comes_from_its_recorded_config():
    """Shapes from the tensors, activation/normalisation/name from the recorded config; a released
    checkpoint records none and is an OpenAI CLIP."""
    cfg = ClipConfig(embed_dim=64, image_size=32, patch_size=16, vision_width=64, vision_layers=1, text_width=64,
                     text_layers=1, activation="gelu", image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                     model_name="x")
    model = create_model("tab_tdb", clip_config=cfg)
    sd = model.state_dict()
    released = ClipConfig.from_checkpoint(sd, None)
    assert released.activation == "quick_gelu" and released.image_mean == OPENAI_MEAN and released.model_name == ""
    recorded = model.config.to_dict()["clip"]
    assert ClipConfig.from_checkpoint(sd, recorded) == cfg
    assert ClipConfig.from_checkpoint(sd, {**recorded, "vision_width": 999}).vision_width == 64  # tensors win


def test_vip_proxies_on_an_l14_336_gelu_backbone(tmp_path):
    ref = reference("L-14-336", False)
    path, name = write("open_clip_safetensors", ref, tmp_path, "L-14-336", False)
    sd, cfg = load_clip(path, name)
    model = create_model(make_config("vip", cfg, vip_frames=2), clip_state_dict=sd).eval()
    assert model.vip.added_cls.shape[1] == 192
    frames = torch.randn(1, 2, 3, 336, 336)
    with torch.no_grad():
        video = model.encode_video(frames, torch.ones(1, 2, dtype=torch.long)).global_
        masked = model.encode_video(frames, torch.tensor([[1, 0]])).global_
    assert video.shape == (1, 128) and torch.isfinite(video).all()
    assert (video - masked).abs().max() > 1e-4  # the second frame takes part unless masked


def test_pretrained_tag_normalisation_and_the_warning_without_it(caplog):
    from clip2video.modules.weights.clip_weights import _warn_if_tags_differ

    _, pcfg = open_clip_config("ViT-L-14:laion2b_s32b_b82k")
    assert tuple(pcfg["mean"]) == tuple(pcfg["std"]) == (0.5, 0.5, 0.5)
    assert open_clip_config("ViT-B-16:openai")[1]["quick_gelu"] is True  # open_clip runs OpenAI's with QuickGELU
    with caplog.at_level(logging.WARNING, logger="clip2video"):
        _warn_if_tags_differ("ViT-L-14")
    assert "laion2b_s32b_b82k" in caplog.text and "ViT-L-14:TAG" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clip2video"):
        _warn_if_tags_differ("ViT-B-16")
    assert caplog.text == ""


TOWER_CONFIGS = {
    "tiny": ClipConfig.tiny(),
    "odd_widths_gelu": ClipConfig(embed_dim=96, image_size=48, patch_size=16, vision_width=96, vision_layers=3,
                                  text_width=64, text_layers=2, vision_mlp_width=200, text_mlp_width=150,
                                  activation="gelu", vision_head_width=32, text_head_width=32, vocab_size=1000,
                                  context_length=40),
}


@pytest.mark.parametrize("name", sorted(TOWER_CONFIGS))
def test_own_towers_equal_open_clips_model_bit_for_bit(name):
    """Our CLIP module against open_clip's CLIP of the same architecture: the same random initialisation
    under one seed (so tiny models trained from scratch are unchanged), the same state-dict keys in the same
    order, bit-identical image and text features, and gradients within float rounding."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from clip2video.modules.network.backbone import build_clip, text_tokens

    cfg = TOWER_CONFIGS[name]

    def ratio(mlp: int, width: int) -> float:
        return 4.0 if not mlp else (mlp + 0.5) / width

    vision = CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width, patch_size=cfg.patch_size,
                           head_width=min(cfg.vision_head_width, cfg.vision_width), image_size=cfg.image_size,
                           mlp_ratio=ratio(cfg.vision_mlp_width, cfg.vision_width))
    text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                       heads=cfg.text_heads, layers=cfg.text_layers,
                       mlp_ratio=ratio(cfg.text_mlp_width, cfg.text_width))
    torch.manual_seed(7)
    ref = CLIP(cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=cfg.quick_gelu)
    torch.manual_seed(7)
    ours = build_clip(cfg)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert all(torch.equal(our_sd[k], ref_sd[k]) for k in ref_sd)

    with torch.no_grad():  # non-trivial LayerNorms and biases
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours.load_state_dict(ref.state_dict())
    images = torch.randn(5, 3, cfg.image_size, cfg.image_size)
    ids = torch.randint(1, cfg.vocab_size, (4, 13))
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(frame_features(ours, images), ref.visual(images))
        x = ref.token_embedding(ids) + ref.positional_embedding[:13]
        expected = ref.ln_final(ref.transformer(x, attn_mask=ref.attn_mask[:13, :13])) @ ref.text_projection
        assert torch.equal(text_tokens(ours, ids), expected)

    for model, run in ((ref, lambda: ref.visual(images)), (ours, lambda: frame_features(ours, images))):
        model.train()
        run().square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        if p.grad is not None:
            g = ref_grads[key].grad  # QuickGELU's backward is ours on one side: float rounding, not more
            assert (p.grad - g).abs().max() <= 1e-5 * g.abs().max(), key
