#!/usr/bin/env python
"""Search your own videos by text: build an index of a folder of videos, query it, serve it.

A thin entry point: the command lives in ``clip2video.cli.search`` (installed as ``clip2video-search``); run
``python search.py --help`` for its flags.
"""

import importlib.util
import sys

if importlib.util.find_spec("clip2video") is None or importlib.util.find_spec("clip2video.modules") is None:
    sys.exit("search.py: error: the clip2video package is not installed; "
             "run: pip install -e . (scripts/env.sh does)")

from clip2video.cli.search import console  # noqa: E402 - after the check above

if __name__ == "__main__":
    console()
