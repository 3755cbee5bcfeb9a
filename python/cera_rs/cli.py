"""The ``cera-rs`` command: ``demo`` (the main job), ``bench`` and ``analyze``."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cera-rs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="measure the linear ceiling: CeRA against LoRA, DoRA, on toy and MiniLM"
    )
    demo.add_argument("--quick", action="store_true", help="a short run (about 2 minutes)")
    demo.add_argument("--part", type=int, choices=(1, 2), action="append",
                      help="run only this part (1: linear ceiling, 2: MiniLM)")  # fmt: skip
    demo.add_argument("--out", type=Path, default=Path("results/demo"),
                      help="output folder (default: %(default)s)")  # fmt: skip
    bench = commands.add_parser(
        "bench", help="time cera_rs against plain PyTorch, torch.compile and PEFT LoRA"
    )
    bench.add_argument("--quick", action="store_true", help="tiny shapes, to check it runs")
    bench.add_argument("--headline", action="store_true",
                       help="only the targets' shape (N=4096, d=2048, r=64)")  # fmt: skip
    bench.add_argument("--json", type=Path, default=Path("results/bench/bench.json"),
                       help="where to write the results (default: %(default)s)")  # fmt: skip
    bench.add_argument("--spectral", action="store_true",
                       help="streaming spectra against concatenate-then-SVD instead "
                            "(JSON default: spectral.json beside bench.json)")  # fmt: skip
    analyze = commands.add_parser(
        "analyze", help="weight-level spectra of a saved adapter directory (CeRA or PEFT LoRA)"
    )
    analyze.add_argument("adapter_dir", type=Path)
    analyze.add_argument("--json", type=Path, help="write the report here")
    analyze.add_argument("--plot", type=Path, help="save a figure here (PNG, PDF, SVG)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from cera_rs import demo as demo_job

        demo_job.run(parts=tuple(args.part or (1, 2)), quick=args.quick, out_dir=args.out)
    elif args.command == "bench" and args.spectral:
        from cera_rs.bench import spectral

        results = spectral.run(**(spectral.QUICK if args.quick else {}))
        print(spectral.format_table(results))
        path = args.json
        if path == bench.get_default("json"):
            path = path.with_name("spectral.json")
        spectral.write_json(results, path)
        print(f"\nwritten: {path}")
    elif args.command == "bench":
        from cera_rs.bench import suite

        grid = suite.Grid.quick() if args.quick else suite.Grid()
        if args.headline:
            grid.ds, grid.rs, grid.infer_ns = (2048,), (64,), (1, 16, 4096)
        results = suite.run(grid)
        print(suite.format_table(results))
        suite.write_json(results, args.json)
        print(f"\nwritten: {args.json}")
    elif args.command == "analyze":
        from cera_rs.spectral import adapter_dir_spectrum

        report = adapter_dir_spectrum(args.adapter_dir)
        print(report)
        if args.json:
            report.to_json(args.json)
        if args.plot:
            report.plot(args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
