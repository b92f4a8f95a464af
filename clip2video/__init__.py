"""CLIP2Video text–video retrieval: the one import root of this project.

Everything is imported as ``clip2video.…``:

- ``clip2video.modules``: the model side (network, weights, training, evaluation, runtime); it never imports
  the data side;
- ``clip2video.dataloaders``: the data side (annotations, frames, decoding, datasets, synthetic videos);
- ``clip2video.search``: indexing and searching one's own videos (on-disk format, building, querying, query
  batching, the HTTP app);
- ``clip2video.visualize``: retrieval pictures (joins the two sides);
- ``clip2video.cli``: the command layer (flags, one-line errors, exit codes) and the commands behind the
  repository's ``train.py``, ``infer_retrieval.py``, ``sample_frame.py`` and ``search.py``.

In the repository, ``modules/`` and ``dataloaders/`` sit at the top level (the layout researchers know from
CLIP4Clip and the original CLIP2Video) and are installed as the subpackages above (``setup.py`` maps them; an
editable install, as ``scripts/env.sh`` makes, maps them in a checkout). Nothing else lands in site-packages,
so this tree can sit beside the original trees, whose top-level ``modules`` and ``dataloaders`` would
otherwise collide with ours.
"""

__version__ = "0.3.0"
