"""`fedsilo data split`: one site data file per site from a public dataset (demos, tests).

Examples:
  fedsilo data split --dataset digits --sites 3 --out data        # data/site-1.npz ...
  fedsilo data split --dataset fashion-mnist --sites 5 --partition dirichlet:0.5 --out data

Writes OUT/site-1.npz ... OUT/site-N.npz (the training split, partitioned as
`fedsilo simulate` would) and OUT/server-eval.npz (the test split, for
`fedsilo server start --eval-data`), all in the site data format.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from fedsilo.config import Partition
from fedsilo.errors import ConfigError
from fedsilo.simulations.partition import partition_indices
from fedsilo.task.data import load_dataset, save_npz


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("data", help="prepare site data files (`fedsilo data split`)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = actions.add_parser(
        "split",
        help="split a dataset into one .npz file per site",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--dataset", default="digits", help="digits, fashion-mnist or mnist")
    s.add_argument("--data-dir", default="", help="directory of IDX files")
    s.add_argument("--sites", type=int, required=True, help="number of site files")
    s.add_argument("--partition", default="iid", help="iid, dirichlet:ALPHA or shards:K")
    s.add_argument("--seed", type=int, default=0, help="partitioning seed")
    s.add_argument("--out", required=True, help="directory for the files")
    s.add_argument("--force", action="store_true", help="overwrite existing files")
    s.set_defaults(func=run)


def split(
    dataset: str,
    *,
    sites: int,
    partition: str,
    out: Path,
    data_dir: str = "",
    seed: int = 0,
    force: bool = False,
) -> list[tuple[Path, int]]:
    """Write the site files and the server evaluation file; return (path, examples)."""
    spec = Partition.parse(partition)
    if sites < 1:
        raise ConfigError(f"`--sites` must be >= 1. Found {sites}.")
    targets = [out / f"site-{i + 1}.npz" for i in range(sites)] + [out / "server-eval.npz"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise ConfigError(
            f"{', '.join(existing)} already exist(s); nothing was written. Pass --force "
            "to overwrite."
        )
    train = load_dataset(dataset, "train", data_dir)
    test = load_dataset(dataset, "test", data_dir)
    parts = partition_indices(train.y.numpy(), sites, spec, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, idx in zip(targets, parts, strict=False):
        save_npz(path, train.subset(idx))
        written.append((path, len(idx)))
    save_npz(targets[-1], test)
    written.append((targets[-1], len(test)))
    return written


def run(args: argparse.Namespace) -> int:
    written = split(
        args.dataset,
        sites=args.sites,
        partition=args.partition,
        out=Path(args.out),
        data_dir=args.data_dir,
        seed=args.seed,
        force=args.force,
    )
    for path, n in written:
        Console().print(f"{path}: {n} examples", highlight=False)
    return 0
