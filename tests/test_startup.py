"""Start-up: models built for a checkpoint skip the random draws, checkpoints are memory-mapped, and the
evaluation entry point does not import packages it does not use."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.network.model import CLIP2Video
from clip2video.modules.weights.checkpoint import load_into
from clip2video.modules.weights.factory import create_model, load_model
from clip2video.modules.weights.init_skip import skip_random_init
from clip2video.modules.weights.release import export_original, read_checkpoint

from conftest import ROOT


def tiny():
    torch.manual_seed(0)
    return create_model("tab_tdb", clip_config=ClipConfig.tiny(), mask_layout="original")


def test_skip_random_init_draws_nothing_and_ends_with_the_context():
    config = tiny().config
    torch.manual_seed(1)
    state = torch.get_rng_state()
    with skip_random_init():
        model = CLIP2Video(config)
        assert torch.equal(torch.get_rng_state(), state)  # no random number was drawn for ~7 M parameters
        assert torch.isinf(model.clip.attn_mask).any()  # non-random buffers are still computed
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    assert not torch.equal(a.weight, b.weight)  # outside the context, initialisation is random again


def test_skip_random_init_is_local_to_its_thread():
    seen = {}

    def other():
        before = torch.get_rng_state()
        nn.Linear(16, 16)
        seen["drew"] = not torch.equal(before, torch.get_rng_state())

    with skip_random_init():
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["drew"]


def test_load_model_equals_a_randomly_initialised_model_loaded_the_same_way(tmp_path):
    model = tiny()
    path = export_original(model, tmp_path / "pytorch_model.bin.1")
    fast = load_model(path)
    slow = CLIP2Video(fast.config)
    sd, _ = read_checkpoint(path)
    load_into(slow, sd)
    for (n1, t1), (n2, t2) in zip(fast.state_dict(keep_vars=True).items(), slow.state_dict(keep_vars=True).items(),
                                  strict=True):
        assert n1 == n2 and torch.equal(t1, t2), n1
    for (n1, b1), (n2, b2) in zip(fast.named_buffers(), slow.named_buffers(), strict=True):  # non-persistent too
        assert n1 == n2 and torch.equal(b1, b2), n1
    assert all(p.requires_grad for p in fast.parameters())
    ids = torch.tensor([[49406, 320, 1929, 49407, 0, 0]])
    with torch.no_grad():
        assert torch.equal(fast.eval().encode_text(ids, (ids > 0).long()).global_,
                           model.eval().encode_text(ids, (ids > 0).long()).global_)


def _mapped_from(tensor: torch.Tensor, path) -> bool:
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("no /proc/self/maps to inspect memory mappings")
    ptr, target = tensor.data_ptr(), str(Path(path).resolve())
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def test_checkpoint_tensors_are_memory_mapped_and_old_formats_still_load(tmp_path):
    model = tiny()
    path = export_original(model, tmp_path / "pytorch_model.bin.1")
    sd, _ = read_checkpoint(path)
    key = "clip.token_embedding.weight"
    assert torch.equal(sd[key], model.state_dict()[key])
    assert _mapped_from(sd[key], path)  # the tensor's memory is a mapping of the checkpoint file
    legacy = tmp_path / "legacy.bin"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    old, _ = read_checkpoint(legacy)
    assert torch.equal(old[key], sd[key]) and not _mapped_from(old[key], legacy)
    before = sd[key].clone()
    sd[key].add_(1.0)  # a private mapping: writing to a loaded tensor never changes the file
    again, _ = read_checkpoint(path)
    assert torch.equal(again[key], before)


def test_eval_entry_point_imports_no_unused_heavy_package():
    code = ("import sys\nfrom clip2video.cli import infer_retrieval\ninfer_retrieval.build_parser()\n"
            "from clip2video.modules.evaluation import engine\nfrom clip2video.modules.weights import checkpoint\n"
            "from clip2video.modules.network import model\n"
            "print(' '.join(m for m in ('faiss', 'fastapi', 'uvicorn', 'cv2', 'pandas', 'tensorboard', "
            "'torch.utils.tensorboard', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_evaluation_path_imports_neither_open_clip_nor_torchvision(tmp_path):
    """Building a model, tokenising, decoding JPEG frames and encoding both never import open_clip,
    torchvision, timm or torch._dynamo (seconds of start-up per process, for code we do not run)."""
    folder = tmp_path / "v"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(folder / f"{i + 1:08d}.jpg", quality=90)
    code = (
        "import sys, torch\n"
        "from clip2video.modules.network.backbone import ClipConfig\n"
        "from clip2video.modules.weights.factory import create_model\n"
        "from clip2video.modules.network.tokenizer import ClipTokenizer\n"
        "from clip2video.dataloaders.frames import _torch_jpeg_matches_pillow, load_video\n"
        "model = create_model('tab_tdb', clip_config=ClipConfig.tiny()).eval()\n"
        "ids, mask = ClipTokenizer(32).batch(['a man is cooking', 'a dog runs'])\n"
        f"frames, vmask, _ = load_video({str(folder)!r}, max_frames=4, image_size=32)\n"
        "with torch.no_grad():\n"
        "    model.encode_text(ids, mask)\n"
        "    model.encode_video(frames[None], vmask[None])\n"
        "assert _torch_jpeg_matches_pillow()\n"
        "print(sorted(m for m in ('open_clip', 'torchvision', 'timm', 'torch._dynamo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
