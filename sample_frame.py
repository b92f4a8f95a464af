#!/usr/bin/env python
"""Extract frames from a folder of videos: FRAMES/<video_id>/00000001.jpg, ...

A thin entry point: the command lives in ``clip2video.cli.sample_frame`` (installed as ``clip2video-extract``); run
``python sample_frame.py --help`` for its flags.
"""

import importlib.util
import sys

if importlib.util.find_spec("clip2video") is None or importlib.util.find_spec("clip2video.modules") is None:
    sys.exit("sample_frame.py: error: the clip2video package is not installed; "
             "run: pip install -e . (scripts/env.sh does)")

from clip2video.cli.sample_frame import main  # noqa: E402 - after the check above

if __name__ == "__main__":
    sys.exit(main())
