"""The ``cera-rs`` command: ``demo`` (the main job), ``compare``, ``bench``, ``analyze``
and ``export-lora``.

A user's mistake (a wrong path, an unreadable adapter, a missing optional dependency,
a bad option) is one line on stderr and exit status 2; ``--debug`` shows its
traceback. A demo part that fails is one line and exit status 1. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import cera_rs
from cera_rs.atomic import check_writable
from cera_rs.extras import MATPLOTLIB, MissingDependency, require

USER_ERRORS = (OSError, ValueError, MissingDependency)
RESULTS = Path("results")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage errors: one line too
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _parser() -> argparse.ArgumentParser:
    from cera_rs.demo import PARTS

    version = (
        f"cera-rs {cera_rs.__version__} (torch {cera_rs.torch.__version__}; extension "
        f"built for torch {cera_rs._native.TORCH_VERSION})"
    )
    description = __doc__.split("\n\n")[0].replace("``", "")  # docstring markup, not --help's
    parser = _Parser(prog="cera-rs", description=description)
    parser.add_argument("--version", action="version", version=version)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    # Also accepted after the command; SUPPRESS keeps it from resetting the flag above.
    debug = _Parser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks of user errors",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser(
        "demo",
        parents=[debug],
        help="measure the linear ceiling: CeRA against LoRA, DoRA, on toy and SmolLM2",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="fewer steps, seeds and facts: minutes on 2 cores, not the full ~20, "
        "and too small to separate anything (its report says so)",
    )
    demo.add_argument(
        "--part",
        type=int,
        choices=sorted(PARTS),
        action="append",
        help="run only this part: " + ", ".join(f"{n}: {p.title}" for n, p in PARTS.items()),
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "demo",
        help="output folder, created if missing (default: %(default)s)",
    )
    bench = commands.add_parser(
        "bench",
        parents=[debug],
        help="time cera_rs against plain PyTorch, torch.compile and PEFT LoRA",
    )
    bench.add_argument("--quick", action="store_true", help="tiny shapes, to check it runs")
    bench.add_argument(
        "--headline",
        action="store_true",
        help="only the targets' shape (N=4096, d=2048, r=64; on CUDA N=8192, d=4096, r=64)",
    )
    bench.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: the GPU grid (d 2048/4096, N=8192, r 16/64/256, bf16 "
        "and fp32) (default: %(default)s)",
    )
    bench.add_argument(
        "--json",
        type=Path,
        help="where to write the results (default: results/bench/bench.json; "
        "spectral.json, export.json, layers.json, model.json with "
        "--spectral, --export, --layers, --model)",
    )
    kind = bench.add_mutually_exclusive_group()
    kind.add_argument(
        "--spectral",
        action="store_true",
        help="streaming spectra against concatenate-then-SVD instead",
    )
    kind.add_argument(
        "--export",
        action="store_true",
        help="the linear export (export-lora's engine) against torch.linalg.lstsq "
        "on kept deltas instead",
    )
    kind.add_argument(
        "--layers",
        action="store_true",
        help="Conv2d at UNet shapes and Embedding (vocab 49152, d 576, 4096 "
        "tokens): CeRA against the plain composition and PEFT LoRA "
        "instead",
    )
    kind.add_argument(
        "--model",
        action="store_true",
        help="one training step of SmolLM2 (q/v of the last 10 layers, batch "
        "16): CeRA silu p=0.1, CeRA identity p=0, LoRA r=8; whole model "
        "and compare's split path, instead",
    )
    _compare_parser(commands, debug)
    analyze = commands.add_parser(
        "analyze",
        parents=[debug],
        help="weight-level spectra of a saved adapter folder (CeRA or PEFT LoRA)",
    )
    analyze.add_argument("adapter_dir", type=Path)
    analyze.add_argument("--json", type=Path, help="write the report here")
    analyze.add_argument("--plot", type=Path, help="save a figure here (PNG, PDF, SVG)")
    export = commands.add_parser(
        "export-lora",
        parents=[debug],
        help="a saved CeRA adapter as the best PEFT LoRA of a given rank, fitted on token ids "
        "or model inputs",
        description="Fits the best rank-k PEFT LoRA to each CeRA layer of a saved adapter and "
        "reports how linear each is. Linear layers: fitted on their inputs over "
        "--data; convolutions: a LoRA conv fitted on their input patches over "
        "--data; embeddings: exact, the truncated SVD of the branch's d x vocab "
        "table, each id weighted by its count in --data (all alike without "
        "--data).",
    )
    export.add_argument("adapter_dir", type=Path)
    export.add_argument("out_dir", type=Path, help="where to write the LoRA adapter folder")
    export.add_argument(
        "--data",
        type=Path,
        help="transformers models: token ids, .npy or .pt (2-D: a sequence per "
        "row; 1-D: cut into --seq-len pieces) or .txt (a sequence per "
        "line). diffusers models (UNets, images): inputs, a .pt or "
        ".safetensors file of a dict of tensors (keyword arguments: "
        "sample, timestep, encoder_hidden_states), or of one tensor (also "
        ".npy), or a folder of such files, split along the first dimension "
        "into --batch-size batches. Optional when only embeddings are "
        "adapted",
    )
    export.add_argument(
        "--held-out",
        type=Path,
        help="inputs (as --data) to also measure each map's linearity on; "
        "--data's own linearity flatters the fit unless it holds many "
        "times a layer's input width in tokens",
    )
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument("--rank", type=int, help="the LoRA rank of every layer")
    target.add_argument(
        "--energy",
        type=float,
        help="per layer, the smallest rank keeping this share of the best "
        "linear map's output energy (e.g. 0.99)",
    )
    export.add_argument(
        "--ridge",
        type=float,
        default=0.0,
        help="ridge, relative to E[x x^T]'s mean eigenvalue (default: 0, least squares)",
    )
    export.add_argument("--bias", action="store_true", help="fit a bias too (lora_bias)")
    export.add_argument(
        "--base",
        type=Path,
        help="base model folder (default: the adapter config's base_model_name_or_path)",
    )
    export.add_argument("--batch-size", type=int, default=8)
    export.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="piece length for 1-D token ids (default: %(default)s)",
    )
    export.add_argument("--json", type=Path, help="write the linearity report here")
    export.add_argument("--plot", type=Path, help="save the linearity figure here")
    export.add_argument(
        "--gguf",
        type=Path,
        help="also write the LoRA as a llama.cpp adapter (GGUF) here; needs --gguf-base",
    )
    export.add_argument(
        "--gguf-base",
        type=Path,
        help="the base model's GGUF file, which llama.cpp loads the adapter "
        "onto: its tensor names, shapes and architecture",
    )
    return parser


def _numbers(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers, got {text!r}"
            ) from None

    return parse


def _compare_parser(commands, debug: argparse.ArgumentParser) -> None:
    from cera_rs.compare import BUILTIN_MODEL, Settings

    d = Settings()
    p = commands.add_parser(
        "compare",
        parents=[debug],
        help="train several adapter methods the same way and say, with intervals, which "
        "is better on your model and data",
        description="Trains and scores each METHOD on one base model and one data set with "
        "the same data order and init seeds, and reports each against the first "
        "(or --reference) with a paired 95 % bootstrap interval. A METHOD is a "
        "spec (cera:r=64, lora:r=512,lora_alpha=32, dora:r=8, hira:r=32) or a PEFT "
        "method_comparison experiment folder. A list sweeps a field, one method "
        "per value (lora:r=[1,4,16,64]: a rank curve, from which each CeRA "
        "method's parameter multiplier is read), and lora:r=full puts every "
        "targeted layer at its own full rank (the linear ceiling); "
        "lrs=[1e-3,3e-3] in a spec is that method's own rate grid instead of "
        "--lrs (large adapters often need lower rates). Finished "
        "runs are kept in --out: the same command again resumes.",
    )
    p.add_argument("methods", nargs="+", metavar="METHOD")
    p.add_argument(
        "--model",
        default=BUILTIN_MODEL,
        help="a transformers causal-LM folder, or %(default)s (the built-in SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--data",
        help="built-in problems: tiers:hard, tiers:easy, or phonebook:N "
        "(N made-up names and numbers to memorise; scored by "
        "recall and by the bits stored)",
    )
    p.add_argument("--train", type=Path, help='JSONL, one {"prompt", "completion"} a line')
    p.add_argument(
        "--valid",
        type=Path,
        help="JSONL (default: the last 100 training problems, at most a fifth)",
    )
    p.add_argument("--test", type=Path, help="JSONL")
    p.add_argument(
        "--sizes",
        type=_numbers(int),
        help="train,valid,test problems of --data (default: 960,100,300)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="(default: %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="(default: %(default)s)")
    p.add_argument(
        "--lrs",
        type=_numbers(float),
        default=d.lrs,
        help="learning-rate grid, each method's chosen on the valid split "
        "(default: 3e-4,1e-3,3e-3)",
    )
    p.add_argument(
        "--seeds",
        type=_numbers(int),
        default=d.seeds,
        help="data-order and init seeds of the reported runs (default: 1,2,3)",
    )
    p.add_argument(
        "--select-seed",
        type=int,
        help="the seed of the runs that choose each method's rate (and --tune's fields); "
        "never reported (default: the one below the smallest --seeds, or above the largest "
        "where that is 0)",
    )
    p.add_argument(
        "--tune",
        type=lambda text: tuple(w.strip() for w in text.split(",") if w.strip()),
        default=(),
        metavar="WORDS",
        help="besides the rate, tune for every method, jointly with the rate on the "
        "selection runs: dropout (LoRA's lora_dropout, CeRA's cera_dropout: 0, 0.1 and "
        "the method's own), scale (lora_alpha or scaling: 0.5, 1 and 2 times the "
        "method's own); each multiplies a method's selection runs (--lrs's rates times "
        "2 or 3 per word). In a spec, field={a,b} tunes any field",
    )
    p.add_argument(
        "--resolve",
        type=float,
        metavar="D",
        help="after the --seeds, add seeds until every interval against the "
        "reference is within +-D points (or --max-seeds are run)",
    )
    p.add_argument(
        "--max-seeds",
        type=int,
        metavar="S",
        help="with --resolve: the most seeds, the first ones included",
    )
    p.add_argument(
        "--adapted-layers",
        type=int,
        help="adapters on the last K decoder layers only; the frozen layers' "
        "outputs are computed once (much faster)",
    )
    p.add_argument("--max-seq-length", type=int, help="refuse longer problems")
    p.add_argument(
        "--reference", help="the method the others are compared with (default: the first)"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA with bf16 autocast when there, else CPU",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "compare",
        help="output folder, created if missing (default: %(default)s)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run each run as a Ray task: on a Ray started here, or on the "
        "cluster at ADDRESS (auto, ray://HOST:PORT); give it after the "
        "METHODs (needs cera_rs[ray])",
    )
    p.add_argument(
        "--gpus-per-run",
        type=float,
        help="with --ray: GPUs per run (default: 1 on a cluster with GPUs)",
    )
    p.add_argument(
        "--cpus-per-run",
        type=int,
        help="with --ray: CPU cores per run, torch's threads in it (default: 1)",
    )


def _ray(args: argparse.Namespace):
    """``--ray``'s options; ``--gpus-per-run`` and ``--cpus-per-run`` need it."""
    if args.ray is None:
        if args.gpus_per_run is not None or args.cpus_per_run is not None:
            raise ValueError("--gpus-per-run and --cpus-per-run are for --ray")
        return None
    from cera_rs.compare import Ray

    return Ray(args.ray, args.gpus_per_run, args.cpus_per_run or 1)


def _compare(args: argparse.Namespace) -> None:
    from cera_rs.compare import Settings, compare, report

    settings = Settings(
        steps=args.steps,
        batch=args.batch,
        lrs=args.lrs,
        seeds=args.seeds,
        select_seed=args.select_seed,
        tune=args.tune,
        adapted_layers=args.adapted_layers,
        max_seq_length=args.max_seq_length,
        reference=args.reference,
        device=args.device,
        resolve=args.resolve,
        max_seeds=args.max_seeds,
    )
    summary = compare(
        args.methods,
        model=args.model,
        data=args.data,
        train=args.train,
        test=args.test,
        valid=args.valid,
        out_dir=args.out,
        settings=settings,
        sizes=args.sizes,
        ray=_ray(args),
    )
    print("\n" + report.scores_markdown(summary) + "\n\n" + report.costs_markdown(summary))
    curves = ", curves.png" if summary["curves"] else ""
    print(
        f"\nwritten: {args.out / 'report.md'}, summary.json, exact_match.png{curves}, peft_results/"
    )


def _demo(args: argparse.Namespace) -> None:
    from cera_rs import demo

    demo.run(parts=tuple(args.part or sorted(demo.PARTS)), quick=args.quick, out_dir=args.out)


def _bench(args: argparse.Namespace) -> None:
    name = next((n for n in ("spectral", "export", "layers", "model") if getattr(args, n)), "bench")
    default = RESULTS / "bench" / f"{name}.json"
    path = args.json or default
    if args.json is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path)  # before minutes of timing, not after
    if args.spectral:
        from cera_rs.bench import spectral

        results = spectral.run(**(spectral.QUICK if args.quick else {}))
        print(spectral.format_table(results))
        spectral.write_json(results, path)
    elif args.export:
        from cera_rs.bench import export, spectral

        results = export.run(**(export.QUICK if args.quick else export.FULL))
        print(export.format_table(results))
        spectral.write_json(results, path)
    elif args.layers:
        from cera_rs.bench import layers

        results = layers.run_layers(
            layers.QUICK if args.quick else layers.FULL,
            repeats=2 if args.quick else 7,
            device=args.device,
        )
        print(layers.format_layers(results))
        layers.write_json(results, path)
    elif args.model:
        from cera_rs.bench import layers

        results = layers.run_model(case=layers.MODEL_QUICK if args.quick else layers.ModelCase())
        print(layers.format_model(results))
        layers.write_json(results, path)
    else:
        from cera_rs.bench import suite

        if args.device == "cuda":
            grid = suite.Grid.cuda_quick() if args.quick else suite.Grid.cuda()
        else:
            grid = suite.Grid.quick() if args.quick else suite.Grid()
        if args.headline and args.device == "cuda":
            grid.ds, grid.rs = (suite.CUDA_HEADLINE["d"],), (suite.CUDA_HEADLINE["r"],)
        elif args.headline:
            grid.ds, grid.rs, grid.infer_ns = (2048,), (64,), (1, 16, 4096)
        results = suite.run(grid, checkpoint=path)
        print(suite.format_table(results))
        suite.write_json(results, path)
    print(f"\nwritten: {path}")


def _analyze(args: argparse.Namespace) -> None:
    from cera_rs.spectral.adapter_dir import adapter_dir_spectrum, adapter_subfolders

    for path in (args.json, args.plot):
        if path is not None:
            check_writable(path)
    if args.plot is not None:
        require("cera-rs analyze --plot", [MATPLOTLIB])
    report = adapter_dir_spectrum(args.adapter_dir)
    print(report)
    others = adapter_subfolders(args.adapter_dir)
    if others:
        print(
            f"note: {args.adapter_dir} also holds adapters in the subfolders "
            f"{', '.join(others)}; pass one of them to analyze it",
            file=sys.stderr,
        )
    if args.json is not None:
        report.to_json(args.json)
    if args.plot is not None:
        report.plot(args.plot)


def _export_lora(args: argparse.Namespace) -> None:
    from cera_rs.export.adapter_dir import export_adapter_dir

    for path in (args.json, args.plot):
        if path is not None:
            check_writable(path)
    if args.plot is not None:
        require("cera-rs export-lora --plot", [MATPLOTLIB])
    if args.gguf is not None or args.gguf_base is not None:
        _check_gguf(args)
    exported = export_adapter_dir(
        args.adapter_dir,
        args.data,
        args.out_dir,
        rank=args.rank,
        energy=args.energy,
        ridge=args.ridge,
        bias=args.bias,
        base=args.base,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        held_out=args.held_out,
    )
    print(exported.report)
    if args.json is not None:
        exported.report.to_json(args.json)
    if args.plot is not None:
        exported.report.plot(args.plot)
    if args.gguf is not None:
        from cera_rs.export import save_gguf_lora

        save_gguf_lora(exported, args.gguf, base_gguf=args.gguf_base)
    print(f"\nwritten: {', '.join(str(p) for p in (args.out_dir, args.gguf) if p is not None)}")


def _check_gguf(args: argparse.Namespace) -> None:
    """``--gguf``'s needs, before the fit: a base GGUF llama.cpp can take the adapter
    onto, no bias, the gguf package, a writable path."""
    from cera_rs.export.gguf_lora import BaseGGUF

    if args.gguf is None:
        raise ValueError("--gguf-base is for --gguf OUT.gguf, which is missing")
    if args.gguf_base is None:
        raise ValueError(
            "--gguf needs --gguf-base BASE.gguf: the GGUF model llama.cpp loads the adapter onto"
        )
    if args.bias:
        raise ValueError("--gguf: llama.cpp LoRA adapters hold no bias; drop --bias")
    check_writable(args.gguf)
    BaseGGUF.read(args.gguf_base)


COMMANDS = {
    "demo": _demo,
    "compare": _compare,
    "bench": _bench,
    "analyze": _analyze,
    "export-lora": _export_lora,
}


def main(argv: list[str] | None = None) -> int:
    from cera_rs.demo import PartFailed

    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except PartFailed as err:
        if args.debug:
            raise
        print(f"cera-rs: error: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"cera-rs: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        # what finished is on disk (compare and demo write each result whole): say so,
        # not a traceback of wherever the interrupt landed; 130 is the shell's 128 + SIGINT
        print(
            "cera-rs: interrupted; files written are whole, and compare resumes where it stopped",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
