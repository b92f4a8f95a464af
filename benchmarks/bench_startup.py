#!/usr/bin/env python
"""Start-up of an evaluation: imports, then model construction + checkpoint loading, then the exit, each in a
fresh process.

"imports" covers what evaluation loads before its first caption: the package, torch, the CLIP model code,
the JPEG decoder and the BPE vocabulary.

* previous way (``--old`` in the child): what the code did before its own CLIP towers and BPE: open_clip's
  model code and tokenizer (which import torchvision, ``torch._dynamo`` and timm) and torchvision's
  ``decode_jpeg``; ``torch.load`` reading the whole file, the model built with its random initialisation
  (every parameter drawn), then the strict copy of the checkpoint into it; the interpreter's normal exit;
* ours: the evaluation's imports alone (our towers and BPE, torchvision's JPEG operator library loaded
  without the package), ``load_model`` as evaluation calls it (checkpoint memory-mapped, construction
  without random draws), and ``cli.exit_process`` (no interpreter teardown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAKE_WEIGHTS = ROOT.parent / "shared" / "fixtures" / "parity-small" / "make_weights.py"


def previous_imports() -> None:
    """The packages the previous code imported on the way to its first caption and frame."""
    import open_clip.model  # noqa: F401
    import torchvision.io  # noqa: F401
    from open_clip.tokenizer import SimpleTokenizer

    SimpleTokenizer()  # its BPE vocabulary


def child(checkpoint: str, old: bool) -> None:
    """One start-up; prints {"imports_s", "model_s", "digest"} as JSON."""
    t0 = time.perf_counter()
    import torch

    from clip2video.cli import infer_retrieval  # noqa: F401 - what the entry point imports first
    from clip2video.dataloaders import annotations, dataset  # noqa: F401
    from clip2video.dataloaders.frames import _torch_jpeg_op
    from clip2video.modules.evaluation import engine  # noqa: F401
    from clip2video.modules.network.backbone import ClipConfig
    from clip2video.modules.network.model import CLIP2Video, make_config
    from clip2video.modules.network.tokenizer import _bpe
    from clip2video.modules.weights import checkpoint as ck
    from clip2video.modules.weights.factory import load_model

    if old:
        previous_imports()
    else:
        _bpe()  # the BPE vocabulary (loaded by the first caption)
        _torch_jpeg_op()  # the JPEG decoder (loaded by the first frame)
    t1 = time.perf_counter()
    cfg = make_config("tab_tdb", mask_layout="original")
    if old:
        sd = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model = CLIP2Video(make_config("tab_tdb", clip=ClipConfig.from_state_dict(sd, prefix="clip."),
                                       mask_layout="original"))
        ck.load_into(model, sd)
    else:
        model = load_model(checkpoint, cfg)
    t2 = time.perf_counter()
    digest = float(sum(p.detach().double().sum() for p in model.parameters()))
    print(json.dumps({"imports_s": t1 - t0, "model_s": t2 - t1, "digest": digest}), flush=True)
    if not old:
        from clip2video.cli.common import exit_process

        exit_process(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--weights", type=Path, default=Path("/tmp/clip2video-bench-e2e/weights"))
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--old", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.old)
        return
    ckpt = a.checkpoint or str(a.weights / "ckpt" / "pytorch_model.bin.2")
    if not Path(ckpt).is_file():
        if not MAKE_WEIGHTS.is_file():
            sys.exit(f"{ckpt} not found and no {MAKE_WEIGHTS} to make it")
        subprocess.run([sys.executable, str(MAKE_WEIGHTS), str(a.weights)], check=True, capture_output=True)
    runs: dict[str, list[dict]] = {"old": [], "ours": []}
    order = ["old", "ours", "ours", "old"]
    for i in range(2 * a.repeats):
        name = order[i % 4]
        cmd = [sys.executable, __file__, "--child", ckpt] + (["--old"] if name == "old" else [])
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rec["process_s"] = time.perf_counter() - t0
        runs[name].append(rec)
    digests = {r["digest"] for rs in runs.values() for r in rs}
    if len(digests) != 1:
        sys.exit(f"the two ways built different models: {digests}")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("imports_s", "model_s", "process_s")}
           for n, rs in runs.items()}
    for n in ("old", "ours"):
        m = med[n]
        print(f"{n:>4}: imports {m['imports_s']:.2f} s, model + checkpoint {m['model_s']:.2f} s, "
              f"whole process {m['process_s']:.2f} s (median of {a.repeats})")
    print(f"start-up (whole process) {med['old']['process_s'] / med['ours']['process_s']:.2f}x; "
          f"model + checkpoint speed-up: {med['old']['model_s'] / med['ours']['model_s']:.2f}x")


if __name__ == "__main__":
    main()
