"""Write a latentx task with images as verl train / test Parquet files (``images`` column, ``data.image_key=images``)
for examples/verl/qwen2.5-vl-3b-relax.sh; rewarded by ``latentx.integrations.verl.data.compute_score``.

    # Geometry3K-style files (problem with <image>, answer, images), graded by the math grader
    python examples/verl/vl_data.py --task vmath --data geometry3k/train.parquet \\
        --options '{"eval_path": "geometry3k/test.parquet"}' --out ~/data/geo3k-latentx
    # the procedural visual countdown (operands only in the image), no download
    python examples/verl/vl_data.py --task vcountdown --options '{"min_operands": 2, "max_operands": 3}' \\
        --train-size 20000 --test-size 512 --out ~/data/vcountdown

Schema: ``latentx.integrations.verl.data`` (verl 0.9.1's RLHFDataset).  Runs in either environment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from latentx.integrations.verl.data import verl_rows, write_parquet
from latentx.tasks import get_task

# vcountdown's prompt is the target alone (">63:"); a pretrained VLM is told the answer format.
VCOUNTDOWN_SYSTEM = (
    "The image shows numbers. Answer on one line: first the numbers in the order shown, separated by spaces, "
    "then '|', then steps that reach the target given after '>' using each number once with + - * /, "
    "comma-separated, e.g. 14 9 2|14/2=7,9*7=63"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="vcountdown", help="latentx task name (vcountdown, vmath, any registered task)")
    parser.add_argument("--options", default="{}", help="the task's options, JSON")
    parser.add_argument("--data", default=None, help="problem file (the task's path option) for vmath / math")
    parser.add_argument("--out", required=True, help="directory for train.parquet and test.parquet")
    parser.add_argument("--train-size", type=int, default=None, help="training rows (default: every problem / 20000)")
    parser.add_argument("--test-size", type=int, default=None, help="held-out rows (default: every problem / 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system", default=None, help="system turn (default: the task's, or the vcountdown format)")
    args = parser.parse_args(argv)

    options = json.loads(args.options)
    if not isinstance(options, dict):
        parser.error("--options must be a JSON object")
    if args.data:
        options["path"] = args.data
    task = get_task(args.task, **options)
    pools = getattr(task, "pools", None)  # file-backed tasks: every problem of each split by default
    sizes = {
        "train": args.train_size or (len(pools["train"]) if pools else 20000),
        "test": args.test_size or (len(pools["eval"]) if pools else 512),
    }
    system = args.system if args.system is not None else (VCOUNTDOWN_SYSTEM if args.task == "vcountdown" else None)
    out = Path(args.out).expanduser()
    for split, n in sizes.items():
        instances = task.train_instances(n, args.seed) if split == "train" else task.eval_instances(n, args.seed)
        path = write_parquet(verl_rows(task, args.task, options, instances, split, system=system), out / f"{split}.parquet")
        print(f"{path}: {len(instances)} rows")


if __name__ == "__main__":
    main()
