#!/usr/bin/env python
"""Run the original CLIP2Video ``infer_retrieval.py`` unchanged and keep what it ranks.

    ORIGINAL_SAVE_SIM=sim.npy ORIGINAL_SAVE_METRICS=metrics.json \\
        python benchmarks/original_runner.py ORIGINAL_ROOT [the original's infer_retrieval.py flags]

The original prints its metrics to a log and keeps its similarity matrix to itself; ``bench_eval_e2e.py``
needs both to check that the two codebases agree before it compares their times. So this wraps, at run time,
the original's ``evaluation.eval.logging_rank`` (it receives the ×100 caption × video matrix, before the
multi-caption reshaping) and the two metric functions it calls, then runs the script as ``__main__``. No file
of the original is changed; the wrapper's own cost is one ``np.save`` of the matrix.
"""

from __future__ import annotations

import json
import os
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2 or not os.path.isfile(os.path.join(sys.argv[1], "infer_retrieval.py")):
        sys.exit("usage: original_runner.py ORIGINAL_ROOT [flags]: ORIGINAL_ROOT/infer_retrieval.py not found")
    root = os.path.abspath(sys.argv[1])
    # the original's packages (``modules``, ``dataloaders``, ...) share names with this codebase's: only its
    # folder may provide them
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [root] + [p for p in sys.path if os.path.abspath(p or ".") not in (ours, os.path.dirname(__file__))]
    import numpy as np
    from evaluation import eval as original_eval  # the original's module

    results: list[dict] = []

    def keep(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            results.append(out)
            return out

        return wrapped

    logging_rank = original_eval.logging_rank

    def logging_rank_saving(sim_matrix, *args, **kwargs):
        if os.environ.get("ORIGINAL_SAVE_SIM"):
            np.save(os.environ["ORIGINAL_SAVE_SIM"], np.asarray(sim_matrix, dtype=np.float32))
        names = ("compute_metrics", "tensor_text_to_video_metrics")
        saved = {n: getattr(original_eval, n) for n in names}
        for n in names:
            setattr(original_eval, n, keep(saved[n]))
        try:
            return logging_rank(sim_matrix, *args, **kwargs)
        finally:
            for n in names:
                setattr(original_eval, n, saved[n])
            if os.environ.get("ORIGINAL_SAVE_METRICS") and len(results) >= 2:
                t2v, v2t = results[-2:]  # logging_rank scores text→video first, then video→text
                summary = {d: {"R1": float(m["R1"]), "R5": float(m["R5"]), "R10": float(m["R10"]),
                               "MdR": float(m["MR"]), "MnR": float(m["MeanR"])}
                           for d, m in (("t2v", t2v), ("v2t", v2t))}
                with open(os.environ["ORIGINAL_SAVE_METRICS"], "w") as f:
                    json.dump(summary, f, indent=1)

    original_eval.logging_rank = logging_rank_saving
    script = os.path.join(root, "infer_retrieval.py")
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
