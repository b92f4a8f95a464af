"""CLIP2Video text–video retrieval: the installable package.

Installed (``pip install .``), everything lives under this one name: ``clip2video.modules`` (model side),
``clip2video.dataloaders`` (data side), ``clip2video.cli`` (the command-line layer shared by the entry
points) and the entry points themselves (``clip2video.train``, ``clip2video.infer_retrieval``,
``clip2video.sample_frame``, ``clip2video.search``). Nothing else lands in site-packages, so this tree can
sit beside the original CLIP2Video / CLIP4Clip trees, whose top-level ``modules`` and ``dataloaders``
would otherwise collide with ours.

In a source checkout the repository keeps its historical layout (``modules/``, ``dataloaders/`` and the
entry scripts at the top level, beside this folder); the repository root is then added to this package's
search path so that the same import names resolve there, with no ``sys.path`` edits anywhere.
"""

from __future__ import annotations

import os as _os

__version__ = "0.2.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
_installed = _os.path.isdir(_os.path.join(_here, "modules"))
if not _installed and _os.path.isfile(_os.path.join(_root, "modules", "__init__.py")):
    __path__.append(_root)  # noqa: F821  (a package's __path__ is defined at import time)
