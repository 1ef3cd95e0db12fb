"""Write a seeded synthetic head-CT ICH dataset (volumes, masks, split CSVs, cases.json).

Run from the repository root, e.g.::

    sam3d-make-synthetic --output_dir outputs/synthetic --num_cases 24 --seed 0 \
        --val_fraction 0.25 --spacing 0.45 0.45 5.0 --positive_fraction 0.6 --head_scale 1.0

See ``sam3d/data/synthetic.py`` for the phantom model, the RAS+ axis convention and the layout.
"""

from __future__ import annotations

import argparse
import sys

from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser, ConfigError
from sam3d.data.synthetic import ANATOMIES, DEFAULT_FOV_MM, DEFAULT_SPACING_MM, make_synthetic_ich


def parse_args(argv=None) -> argparse.Namespace:
    parser = CommandLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/synthetic", help="dataset folder to (over)write")
    parser.add_argument("--num_cases", type=int, default=24, help="number of scans (>= 2)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; case k depends only on (seed, k)")
    parser.add_argument("--val_fraction", type=float, default=0.25, help="share of patients in val.csv")
    parser.add_argument(
        "--test_fraction", type=float, default=0.0, help="share of patients in test.csv (0 = no test split)"
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=list(DEFAULT_SPACING_MM),
        metavar=("X", "Y", "Z"),
        help="voxel size in mm (in-plane x, y; slice z)",
    )
    parser.add_argument(
        "--fov",
        type=float,
        nargs=3,
        default=list(DEFAULT_FOV_MM),
        metavar=("X", "Y", "Z"),
        help="field of view in mm at head_scale 1",
    )
    parser.add_argument("--positive_fraction", type=float, default=0.6, help="share of scans with a hemorrhage")
    parser.add_argument(
        "--head_scale",
        type=float,
        default=1.0,
        help="shrink head and field of view together (e.g. 0.5 for quick tests)",
    )
    parser.add_argument(
        "--anatomy",
        choices=ANATOMIES,
        default="geometric",
        help="geometric phantoms, or the average real head CT (skull base, sinuses, mimics, five bleed kinds)",
    )
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        paths = make_synthetic_ich(
            args.output_dir,
            num_cases=args.num_cases,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            spacing_mm=tuple(args.spacing),
            positive_fraction=args.positive_fraction,
            head_scale=args.head_scale,
            progress=not args.no_progress,
            fov_mm=tuple(args.fov),
            anatomy=args.anatomy,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for key, path in paths.items():
        if path is not None:
            print(f"{key}: {path}")
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
