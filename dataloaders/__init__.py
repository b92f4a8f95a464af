"""``clip2video.dataloaders``: see ``clip2video/__init__.py`` for the package map.

This folder is installed as ``clip2video.dataloaders``; imported under any other name (``import dataloaders`` from the
repository root) it would be a second copy of every class, so that is refused.
"""

if __name__ != "clip2video.dataloaders":
    raise ImportError(f"import clip2video.dataloaders, not {__name__} (install the project: pip install -e .)")
