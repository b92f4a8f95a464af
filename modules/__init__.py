"""``clip2video.modules``: see ``clip2video/__init__.py`` for the package map.

This folder is installed as ``clip2video.modules``; imported under any other name (``import modules`` from the
repository root) it would be a second copy of every class, so that is refused.
"""

if __name__ != "clip2video.modules":
    raise ImportError(f"import clip2video.modules, not {__name__} (install the project: pip install -e .)")
