"""The ``cera-rs`` command: ``demo`` (the main job) and ``bench``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cera-rs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train CeRA against LoRA on a generated task")
    demo.add_argument("--steps", type=int, default=200)
    bench = commands.add_parser("bench", help="time the Rust branch against plain PyTorch")
    bench.add_argument("--quick", action="store_true", help="tiny shapes, to check it runs")
    bench.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from cera_rs.demo import regression

        regression.run(steps=args.steps)
    elif args.command == "bench":
        from cera_rs.bench import branch

        shape = {"n": 64, "d": 32, "r": 4, "repeats": 2} if args.quick else {}
        result = branch.branch_forward_backward(**shape)
        print(branch.format_result(result))
        if args.json:
            args.json.write_text(json.dumps(branch.as_dict(result), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
