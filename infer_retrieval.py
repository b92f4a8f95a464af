#!/usr/bin/env python
"""Evaluate a CLIP2Video checkpoint on a text-video retrieval protocol (the original's flags).

A thin entry point: the command lives in ``clip2video.cli.infer_retrieval`` (installed as ``clip2video-eval``); run
``python infer_retrieval.py --help`` for its flags.
"""

import importlib.util
import sys

if importlib.util.find_spec("clip2video") is None or importlib.util.find_spec("clip2video.modules") is None:
    sys.exit("infer_retrieval.py: error: the clip2video package is not installed; "
             "run: pip install -e . (scripts/env.sh does)")

from clip2video.cli.infer_retrieval import console  # noqa: E402 - after the check above

if __name__ == "__main__":
    console()
