#!/usr/bin/env python
"""Train CLIP2Video from CLIP weights, on one process or many (torchrun).

A thin entry point: the command lives in ``clip2video.cli.train`` (installed as ``clip2video-train``); run
``python train.py --help`` for its flags.
"""

import importlib.util
import sys

if importlib.util.find_spec("clip2video") is None or importlib.util.find_spec("clip2video.modules") is None:
    sys.exit("train.py: error: the clip2video package is not installed; "
             "run: pip install -e . (scripts/env.sh does)")

from clip2video.cli.train import main  # noqa: E402 - after the check above

if __name__ == "__main__":
    sys.exit(main())
