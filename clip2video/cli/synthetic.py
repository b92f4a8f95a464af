"""``python -m clip2video.cli.synthetic OUT``: the synthetic moving-shapes set of
``clip2video.dataloaders.synthetic`` as a command (the demo and the tests call the library directly)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from clip2video.dataloaders import synthetic


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clip2video.cli.synthetic OUT --n_videos 200 --seed 0``; exit 2 on bad arguments."""
    p = argparse.ArgumentParser(prog="python -m clip2video.cli.synthetic",
                                description=synthetic.__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--n_videos", type=int, default=200, help="even: clips come in time-reversed twin pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n_frames", type=int, default=20)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--write", choices=("mp4", "frames"), default="mp4")
    p.add_argument("--splits", default="0.7,0.1,0.2", help="train,val,test fractions of twin pairs")
    p.add_argument("--captions_per_video", type=int, default=2)
    p.add_argument("--motions", default=",".join(synthetic.DIRECTIONS),
                   help=f"comma-separated, from {sorted(synthetic.OPPOSITE)}")
    p.add_argument("--overwrite", action="store_true")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        splits = tuple(float(x) for x in args.splits.split(","))
    except ValueError:
        print(f"{p.prog}: error: --splits must be three comma-separated numbers (got {args.splits!r})", file=sys.stderr)
        return 2
    try:
        summary = synthetic.make_synthetic_dataset(
            args.out_dir,
            n_videos=args.n_videos,
            seed=args.seed,
            size=args.size,
            n_frames=args.n_frames,
            fps=args.fps,
            write=args.write,
            splits=splits,
            captions_per_video=args.captions_per_video,
            motions=[m.strip() for m in args.motions.split(",") if m.strip()],
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
