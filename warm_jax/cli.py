"""`warm-jax`: one subcommand per top-level job; flags + gin in, one function call out.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
Modules are imported lazily so that `warm-jax --help` is instant and a subcommand's heavy
dependencies load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

from warm_jax.errors import UserError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "warm_jax.experiments.quickstart",
        "run the end-to-end default job on the built-in task (what `make quickstart` runs)",
    ),
    "pretrain": ("warm_jax.experiments.pretrain", "pretrain a language model (next-token loss)"),
    "sft": (
        "warm_jax.experiments.sft",
        "supervised fine-tuning: next-token loss on the response tokens only",
    ),
    "bon": (
        "warm_jax.experiments.rl",
        "best-of-n: control reward vs KL = log n - (n-1)/n, selected by proxy rewards",
    ),
    "rl": (
        "warm_jax.experiments.rl",
        "KL-regularised REINFORCE (RLOO/value baseline, SFT/EMA anchor) against a reward",
    ),
    "warp": (
        "warm_jax.experiments.rl",
        "WARP: M REINFORCE runs, SLERP of task vectors, LITI, Pareto front",
    ),
    "import": (
        "warm_jax.experiments.checkpoint_io",
        "import a GGUF or Hugging Face (Llama/Gemma) checkpoint as a model directory",
    ),
    "export": (
        "warm_jax.experiments.checkpoint_io",
        "export a reward model or policy as Hugging Face safetensors + config.json",
    ),
    "data": ("warm_jax.data.commands", "prepare and summarise datasets (TFDS, array_record)"),
    "train-rms": (
        "warm_jax.experiments.reward_models",
        "WARM: train M diverse reward models from one SFT model (sequential or vmapped)",
    ),
    "eval-rm": (
        "warm_jax.experiments.reward_models",
        "evaluate individual / ENS / WARM reward models: accuracies, LMC curves, accuracy vs M",
    ),
    "merge": (
        "warm_jax.merging_checkpoints",
        "merge Orbax checkpoints: average, SLERP of task vectors, LITI (streaming)",
    ),
    "figures": (
        "warm_jax.experiments.figures",
        "regenerate a figure of the WARM / WARP papers at our scale (--list for the figures)",
    ),
}


def _epilog() -> str:
    from warm_jax.config import shipped_gin_files

    files = shipped_gin_files()
    listing = "\n".join(f"  {f}" for f in files) or "  (none found)"
    return (
        "Gin: every gin-driven subcommand takes --gin_file FILE (repeatable; a shipped name like\n"
        "'models/tiny' or a path) and --gin.NAME=VALUE overrides, e.g.\n"
        "  warm-jax pretrain --gin_file models/tiny --gin.train.num_steps=100\n\n"
        f"Shipped gin files:\n{listing}"
    )


def add_gin_arguments(parser: argparse.ArgumentParser, workdir_default: str | None = None) -> None:
    """The flags shared by gin-driven subcommands (`--gin.NAME=VALUE` is collected separately)."""
    parser.add_argument(
        "--gin_file",
        action="append",
        default=[],
        metavar="FILE",
        help="gin file, repeatable; later files override earlier ones",
    )
    parser.add_argument(
        "--workdir",
        default=workdir_default,
        required=workdir_default is None,
        help="where checkpoints, metrics, figures and the operative config are written",
    )
    parser.epilog = _epilog()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def split_gin_bindings(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--gin.NAME=VALUE` (or `--gin.NAME VALUE`) from the other arguments."""
    rest, bindings = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--gin.") and not arg.startswith("--gin_file"):
            body = arg[len("--gin.") :]
            if "=" in body:
                name, value = body.split("=", 1)
            elif i + 1 < len(argv):
                name, value = body, argv[i + 1]
                i += 1
            else:
                raise UserError(f"{arg}: gin override without a value (use --gin.NAME=VALUE)")
            if not name:
                raise UserError(f"{arg}: gin override without a name (use --gin.NAME=VALUE)")
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
        i += 1
    return rest, bindings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warm-jax",
        description=textwrap.dedent(
            """\
            warm_jax: Weight Averaged Reward Models (WARM) and Weight Averaged Rewarded
            Policies (WARP) in JAX/Flax. Each subcommand runs one job configured by gin.
            Run `warm-jax SUBCOMMAND --help` for its flags."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _quiet_library_logs() -> None:
    """Orbax logs absl warnings for every optional metadata file it probes; a user reading the
    terminal should see the project's progress and errors, not those."""
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"warm-jax: error: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    _quiet_library_logs()
    from warm_jax.io.distributed import initialize_from_env

    try:
        initialize_from_env()  # a no-op unless a launcher set WARM_JAX_DISTRIBUTED
    except UserError as e:
        print(f"warm-jax: error: {e}", file=sys.stderr)
        return 2
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"warm-jax {name}", description=help_text)
    module.add_arguments(sub)
    try:
        rest, bindings = split_gin_bindings(rest)
        args = sub.parse_args(rest)
        args.gin_bindings = bindings
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"warm-jax {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
