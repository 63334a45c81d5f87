"""The ``lightning-fms`` command.

``lightning-fms tune --config recipes/demo.yaml --study_dir runs/demo --seed 0 --budget 100`` runs (or
resumes) a study; every option of :class:`~lightning_fms.options.StudyOptions` is a flag (``--searcher gp``,
``--frozen_layers true``, ``--ray.workers 4``, ...) that overrides the recipe. Problems with the input are reported
as one line, ``lightning-fms: error: ...``, with exit status 2 and no traceback; what the study already recorded is
kept.

``lightning-fms fit --model pkg.Module --data pkg.DataModule [--config cfg.yaml] --tuner fms ...`` is
:class:`~lightning_fms.lightning_cli.FMSLightningCLI`'s ``fit`` without a script (any LightningModule and
LightningDataModule, picked by import path; the current directory is importable).

``lightning-fms agent --study_dir runs/s1 [--space space.yaml --hub hub.yaml --budget 30 --monitor val_acc ...]
-- python train.py ...`` runs the user's own command once per decision (see :mod:`lightning_fms.agent`); several
agents may share one study directory. Its study flags are the options :class:`~lightning_fms.agent.AgentSettings`
takes, generated from the same declaration.

``lightning-fms bench --out DIR [--tasks PATH ...] [--methods NAME ...] [--seeds N] [--budget B] [--jobs J]
[--quick]`` runs the benchmark methods side by side on tabulated task pools (see :mod:`lightning_fms.bench`) and
writes ``results.csv``, ``kendall.csv``, figures and ``summary.md`` to ``DIR``; finished runs are kept and
reused when it is run again.

``lightning-fms pretrain --from SOURCE [SOURCE ...] --out PRIOR [--searcher fms --steps 1000 ...]`` learns a
prior from earlier tasks (benchmark task files, pool folders, finished study directories; see
:mod:`lightning_fms.transfer`) and writes it to ``PRIOR``, one safetensors file; its flags are the options of
:class:`~lightning_fms.transfer.pretrain.PretrainOptions`. A study starts its surrogate fits from it with
``--prior PRIOR`` (``tuner.prior`` in a recipe, ``--tuner.prior`` with ``FMSLightningCLI``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from lightning_fms.errors import FMSError, error_line

EXIT_USAGE = 2
DEFAULT_BENCH_TASKS = tuple(
    f"recipes/bench/{name}.yaml"
    for name in ("cnn-digits", "cnn-mnist", "hub-digits", "hub-mnist", "quality-digits", "hub-mnist1d")
)


def _tune_arguments(tune: argparse.ArgumentParser) -> None:
    from lightning_fms.options import add_option_flags, option_names

    tune.add_argument("--config", required=True, help="recipe YAML (see recipes/demo.yaml)")
    tune.add_argument("--study_dir", required=True, help="study directory (resumed if it holds a study)")
    tune.add_argument("--no-progress", action="store_true", help="no live progress display")
    add_option_flags(tune.add_argument_group("study options (each overrides the recipe)"), option_names())


def _agent_arguments(agent: argparse.ArgumentParser) -> None:
    from lightning_fms.agent import AGENT_OPTIONS
    from lightning_fms.options import add_option_flags

    agent.usage = "lightning-fms agent --study_dir DIR [--space FILE --hub FILE --budget N ...] -- COMMAND ..."
    agent.add_argument("--study_dir", required=True, help="study directory (created on first use, else joined)")
    agent.add_argument("--space", default=None, help="search-space file (recipe space format or a W&B sweep)")
    agent.add_argument(
        "--hub",
        default=None,
        help="model hub YAML (as a recipe's hub:): the space's {type: hub} choice picks its entries, and the "
        "command receives the entry's weights file at the choice's name (e.g. --model.pretrained=/abs/x.safetensors)",
    )
    agent.add_argument("--quiet", action="store_true", help="no line per trained epoch on stderr")
    group = agent.add_argument_group("study options (stored by the agent that creates the study; others may omit them)")
    add_option_flags(group, AGENT_OPTIONS)


def _bench_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--out", required=True, help="output directory (finished runs in it are reused)")
    bench.add_argument(
        "--tasks", nargs="+", default=None, help=f"task YAML files (default: {', '.join(DEFAULT_BENCH_TASKS)})"
    )
    bench.add_argument("--methods", nargs="+", default=None, help="method names (default: all)")
    bench.add_argument("--seeds", type=int, default=None, help="number of seeds (default 10; --quick: 3)")
    bench.add_argument("--budget", type=int, default=None, help="epochs per run (default 100; --quick: 50)")
    bench.add_argument("--jobs", type=int, default=1, help="parallel runs (processes)")
    bench.add_argument("--cache_dir", default=None, help="where task pools are cached")
    bench.add_argument(
        "--quick",
        action="store_true",
        help="first task only, methods fms, gp, random and hyperband (unless --methods), 3 seeds, budget 50, "
        "Kendall tau at 25 and 50 epochs",
    )


def _pretrain_arguments(pretrain: argparse.ArgumentParser) -> None:
    from lightning_fms.options import add_option_flags, option_names
    from lightning_fms.transfer.pretrain import PretrainOptions

    pretrain.add_argument(
        "--from",
        dest="sources",
        nargs="+",
        required=True,
        metavar="SOURCE",
        help="benchmark task files, pool folders or finished study directories to learn from",
    )
    pretrain.add_argument("--out", required=True, metavar="PRIOR", help="the prior file to write (.safetensors)")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = pretrain.add_argument_group("pretraining options")
    add_option_flags(group, option_names(PretrainOptions), PretrainOptions)


#: Subcommand -> (its help line, what adds its arguments; ``fit`` is parsed by FMSLightningCLI).
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None] | None]] = {
    "tune": ("run or resume a study described by a recipe", _tune_arguments),
    "agent": ("run your own training command once per decision (several agents may share a study)", _agent_arguments),
    "bench": ("benchmark methods side by side on tabulated task pools", _bench_arguments),
    "pretrain": ("learn a prior for the surrogate from earlier studies and benchmark pools", _pretrain_arguments),
    "fit": (
        "LightningCLI fit (with --tuner fms: a study) of --model and --data given by import path; "
        "see lightning-fms fit --help",
        None,
    ),
}


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``lightning-fms`` parser, with the arguments of ``command`` only (the others keep their help line).

    Building one subcommand's arguments imports what they need (the tuner's option declaration for ``tune``
    and ``agent``), so ``import lightning_fms.cli`` and ``lightning-fms --help`` stay cheap.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-fms",
        description="Forecasting Model Search for PyTorch Lightning: "
        "pick the hub entry and hyperparameters to fine-tune.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (summary, add_arguments) in _COMMANDS.items():
        subparser = sub.add_parser(name, help=summary, add_help=add_arguments is not None)
        if name == command and add_arguments is not None:
            add_arguments(subparser)
    return parser


def _fit(argv: Sequence[str]) -> int:
    """``FMSLightningCLI(model_class=None, datamodule_class=None)`` on ``fit`` + ``argv``."""
    import os

    from lightning_fms.lightning_cli import FMSLightningCLI

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    saved, sys.argv = sys.argv, ["lightning-fms", "fit", *argv]  # parsed from sys.argv, as a script's CLI is
    try:
        FMSLightningCLI(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"prog": "lightning-fms"},
        )
    finally:
        sys.argv = saved
    return 0


def _tune(args: argparse.Namespace) -> int:
    from lightning_fms.options import flag_values, option_names
    from lightning_fms.recipe import Recipe

    recipe = Recipe.from_yaml(args.config, flag_values(args, option_names()))
    tuner = recipe.build_tuner(args.study_dir, progress=not args.no_progress)
    try:
        result = tuner.run()
    finally:
        close = getattr(tuner.executor, "close", None)  # a Ray executor stops its workers (and a local cluster)
        if close is not None:
            close()
    print(json.dumps(result.summary(), indent=2, default=str))
    return 0


def _agent(args: argparse.Namespace, command: Sequence[str]) -> int:
    if not command:
        raise FMSError(
            "give the training command after '--' (e.g. lightning-fms agent --study_dir D -- python train.py)"
        )
    from lightning_fms.agent import AGENT_OPTIONS, AgentSettings, StudyAgent
    from lightning_fms.options import flag_values

    settings = AgentSettings(space_file=args.space, hub=args.hub, **flag_values(args, AGENT_OPTIONS))
    summary = StudyAgent(args.study_dir, command, settings, echo=not args.quiet).run()
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import os
    import shlex
    from pathlib import Path

    from lightning_fms.bench.methods import METHODS, QUICK_METHODS, check_methods
    from lightning_fms.bench.runner import PoolSource, run_bench

    methods = check_methods(args.methods) if args.methods else list(QUICK_METHODS if args.quick else METHODS)
    if args.tasks:
        tasks = list(args.tasks)
        missing = [t for t in tasks if not Path(t).is_file()]
        if missing:
            raise FMSError(f"task file {missing[0]} does not exist")
    else:
        tasks = [t for t in DEFAULT_BENCH_TASKS if Path(t).is_file()]
        if not tasks:
            raise FMSError(
                f"no task files given and none of {', '.join(DEFAULT_BENCH_TASKS)} in {os.getcwd()}; use --tasks"
            )
    for key in ("seeds", "budget", "jobs"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise FMSError(f"--{key} must be >= 1, got {value}")
    if args.quick:
        tasks = tasks[:1]
    seeds = args.seeds or (3 if args.quick else 10)
    budget = args.budget or (50 if args.quick else 100)
    kendall_at = (25, 50) if args.quick else (50, 100)
    sources = [PoolSource(str(t), args.cache_dir, build=True, build_jobs=args.jobs) for t in tasks]
    result = run_bench(
        sources,
        methods,
        seeds,
        budget,
        args.out,
        jobs=args.jobs,
        kendall_at=kendall_at,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        command=shlex.join(["lightning-fms", *argv]),
    )
    summary = {
        "summary": str(result.summary),
        "results": str(result.results_csv),
        "kendall": str(result.kendall_csv),
        "runs": result.ran + result.cached,
        "ran": result.ran,
        "cached": result.cached,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _size(count: int) -> str:
    """A byte count for people: ``"812 B"``, ``"41.3 kB"``, ``"2.06 MB"``."""
    if count < 1000:
        return f"{count} B"
    return f"{count / 1e3:.1f} kB" if count < 1e6 else f"{count / 1e6:.2f} MB"


def _pretrain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lightning_fms.options import flag_values, option_names
    from lightning_fms.transfer.pretrain import PretrainOptions, pretrain

    options = PretrainOptions(**flag_values(args, option_names(PretrainOptions), PretrainOptions))
    missing = [source for source in args.sources if not Path(source).exists()]
    if missing:
        raise FMSError(f"pretraining source {missing[0]} does not exist")
    if Path(args.out).is_dir():
        raise FMSError(f"--out {args.out} is a directory; give the prior file to write")
    result = pretrain(args.sources, args.out, options, progress=not args.no_progress)
    names = ", ".join(str(source.get("name", "?")) for source in result.sources)
    print(
        f"lightning-fms pretrain: wrote {result.path} ({_size(result.bytes)}) in {result.seconds:.1f} s "
        f"from {len(result.sources)} sources ({names})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-fms`` console script; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "fit":
        return _fit(argv[1:])
    command: list[str] = []
    if argv and argv[0] == "agent" and "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = _parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        if args.command == "tune":
            return _tune(args)
        if args.command == "agent":
            return _agent(args, command)
        if args.command == "bench":
            return _bench(args, argv)
        if args.command == "pretrain":
            return _pretrain(args)
    except FMSError as error:
        print(error_line(error), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lightning-fms: interrupted; the study keeps every completed epoch", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
