"""`warm-jax train-rms` and `warm-jax eval-rm`: WARM end to end (DESIGN.md section 1).

train-rms (`train_rms`):
  1. load the SFT model (`--init_from`, a pretrain or SFT workdir) and build the preference-pair
     splits (`pair_data`: the built-in oracle task or HH-RLHF);
  2. fit the reward head by linear probing on frozen SFT features, once (`W/probe`), shared by
     every member;
  3. fine-tune M members with the Bradley–Terry loss and diverse settings (`member_specs`), one
     after another (`mode='sequential'`, each in `W/members/m<i>/`; `--member i` trains only some
     of them, so several jobs can share the work) or as one vmapped program (`mode='vmapped'`,
     trained in `W/vmapped/`, then written to `W/members/m<i>/`);
  4. once every member exists, write the WARM average to `W/warm` (`warm_selection`: all
     members, the best M of K by accuracy on a split, or a greedy soup).

eval-rm (`eval_rm`): accuracies of ind / ENS / WARM on training pairs (clean and corrupted),
ID validation and each OOD set; interpolation curves between members (WA vs ENS vs diagonal);
accuracy vs M. Writes `W/eval/results.json`, `W/eval/lmc.png`, `W/eval/accuracy_vs_m.png`.

Workdir layout: `rm.json` (the experiment: init_from, pair data, member settings, mode),
`model.json` + `tokenizer/` (as in a pretrain workdir), `probe/`, `members/m<i>/` (a training
workdir or a params checkpoint, with `hparams.json`: the member's settings and metrics),
`warm/` (params checkpoint with its selection in `warm_jax.json`), `eval/`.

Nothing is written before the inputs are checked: a missing or damaged member, members of
different architectures or vocabularies, an empty split stop with a UserError first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np

from warm_jax import sharding as shd
from warm_jax.cli import add_gin_arguments
from warm_jax.errors import UserError
from warm_jax.experiments import pretrain as pretrain_lib
from warm_jax.experiments import sft as sft_lib
from warm_jax.models import transformer as tm
from warm_jax.policy import sampling
from warm_jax.reward import data as rdata
from warm_jax.reward import evaluation as ev
from warm_jax.reward import losses
from warm_jax.reward import members as mb
from warm_jax.reward import probe as probe_lib
from warm_jax.reward import warm as warm_lib
from warm_jax.training import checkpoints, loop

PyTree = Any
RM_FILE = "rm.json"
HPARAMS_FILE = "hparams.json"
MEMBERS_DIR = "members"
VMAPPED_DIR = "vmapped"
PROBE_DIR = "probe"
WARM_DIR = "warm"
EVAL_DIR = "eval"
POLICY_RESPONSES_FILE = "policy_responses.json"
MODES = ("sequential", "vmapped")
# Responses the SFT policy writes for pair_data.responses='policy' (prompts are short).
POLICY_MAX_NEW_TOKENS = 32


class PolicyResponder:
    """`pair_data.responses='policy'`: draws pair responses from the SFT policy in `init_from`,
    and remembers them by seed in `W/policy_responses.json`, so that every later evaluation of
    the workdir labels exactly the responses the members were trained on.

    The policy is loaded only when a seed is missing from the file. `save` is separate from
    drawing, so that nothing is written before the workdir's experiment is checked."""

    def __init__(self, workdir: Path, init_from: str, data_cfg: rdata.PairDataConfig, mesh=None):
        self.path = workdir / POLICY_RESPONSES_FILE
        self.init_from, self.data_cfg, self.mesh = init_from, data_cfg, mesh
        self.cache: dict[str, list[str]] = (
            read_json(self.path, "policy responses") if self.path.is_file() else {}
        )
        self.drawn = False
        self._policy = None

    def __call__(self, prompts: list[str], seed: int) -> list[str]:
        hit = self.cache.get(str(seed))
        if hit is not None and len(hit) == len(prompts):
            return hit
        if self._policy is None:
            self._policy = sft_lib.load_model(
                self.init_from, mesh=self.mesh, what="pair_data.responses='policy': init_from"
            )
        config, tokenizer, params = self._policy
        cfg = sampling.SamplingConfig(
            max_new_tokens=POLICY_MAX_NEW_TOKENS,
            temperature=self.data_cfg.policy_temperature,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
        )
        responses = sampling.sample_texts(params, config, tokenizer, prompts, cfg, seed).responses
        self.cache[str(seed)] = responses
        self.drawn = True
        return responses

    def save(self) -> None:
        if self.drawn and jax.process_index() == 0:
            loop.save_json(self.path, self.cache)


def build_splits(
    workdir: Path, data_cfg: rdata.PairDataConfig, tokenizer, init_from: str, mesh=None
) -> tuple[rdata.PairSplits, PolicyResponder | None]:
    """The experiment's pair splits; with policy responses, also their responder (to `save`)."""
    responder = None
    if data_cfg.responses == "policy":
        responder = PolicyResponder(workdir, init_from, data_cfg, mesh)
    return rdata.build_splits(data_cfg, tokenizer, responder), responder


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()[:16]


def member_dir(workdir: str | os.PathLike, index: int) -> Path:
    return Path(workdir) / MEMBERS_DIR / f"m{index}"


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what}: {path} not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what}: {path} is not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- selection


@gin.configurable
def warm_selection(
    select: str = "all", num_select: int | None = None, select_split: str = "validation"
) -> dict:
    """Which members WARM averages: `select='all'`; `'top'`: the `num_select` best by accuracy
    on `select_split` (an evaluation split name: 'validation', 'ood/<name>', 'train'; the paper
    ranks by OOD accuracy); `'greedy'`: a greedy soup on that split (at most `num_select`)."""
    if select not in warm_lib.SELECTIONS:
        raise UserError(f"warm_selection.select={select!r}; choose from {warm_lib.SELECTIONS}")
    if select == "top" and not num_select:
        raise UserError("warm_selection.select='top' needs warm_selection.num_select")
    return {"select": select, "num_select": num_select, "select_split": select_split}


def choose_members(
    members: Sequence[PyTree],
    config: tm.TransformerConfig,
    split_arrays: Mapping[str, Mapping[str, np.ndarray]],
    selection: Mapping[str, Any],
    member_margins: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 64,
) -> tuple[list[int], dict]:
    """Indices of the members to average, and a record of why (scores on the split)."""
    k = len(members)
    if selection["select"] == "all":
        return list(range(k)), {**selection, "scores": None}
    split = selection["select_split"]
    if split not in split_arrays:
        raise UserError(f"warm_selection.select_split={split!r}; splits are {sorted(split_arrays)}")
    arrays = split_arrays[split]
    if member_margins is not None and split in member_margins:
        d = member_margins[split]
    else:
        d = np.stack([ev.margins(p, config, arrays, batch_size) for p in members])
    scores = [ev.accuracy(d[i]) for i in range(k)]
    num = selection["num_select"] or k
    if selection["select"] == "top":
        chosen = warm_lib.select_top(scores, num)
    else:

        def score_of_average(idx: list[int]) -> float:
            avg = warm_lib.warm_average([members[i] for i in idx])
            return ev.accuracy(ev.margins(avg, config, arrays, batch_size))

        chosen = warm_lib.greedy_select(scores, score_of_average, max_members=num)
    return sorted(chosen), {**selection, "scores": scores}


# ----------------------------------------------------------------------------- members on disk


def _expected_members(workdir: Path) -> list[Path]:
    spec = read_json(workdir / RM_FILE, "reward-model workdir")
    return [member_dir(workdir, s["index"]) for s in spec["members"]]


def load_members(
    paths: Sequence[str | os.PathLike], mesh=None
) -> tuple[tm.TransformerConfig, str, list[PyTree], list[dict]]:
    """Loads member checkpoints written by `train_rms`: checks first that each exists, is
    complete, and that all share one architecture and vocabulary; then reads the weights."""
    if not paths:
        raise UserError("no member checkpoints given")
    hparams, names = [], []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"member checkpoint missing: {p}")
        h = read_json(p / HPARAMS_FILE, f"member {p.name}")
        if not h.get("complete"):
            raise UserError(f"member {p} did not finish training (rerun train-rms)")
        hparams.append(h)
        names.append(str(p))
    warm_lib.check_same_model(
        [h["model"] for h in hparams], [h["tokenizer"] for h in hparams], names
    )
    config = tm.TransformerConfig(**hparams[0]["model"])
    target = sft_lib.abstract_params(config, mesh or shd.make_mesh())
    params = [checkpoints.load_params(p, target=target) for p in paths]
    warm_lib.check_mergeable(params, names)
    return config, hparams[0]["tokenizer"], params, hparams


def save_warm(
    workdir: Path, params: PyTree, names: Sequence[str], record: Mapping[str, Any]
) -> Path:
    meta = {"kind": "warm", "members": list(names), "selection": dict(record)}
    return checkpoints.save_params(workdir / WARM_DIR, params, meta)


def read_warm_members(workdir: Path) -> list[str] | None:
    p = workdir / WARM_DIR / checkpoints.META_FILE
    if not p.is_file():
        return None
    return read_json(p, "WARM checkpoint").get("members")


# ----------------------------------------------------------------------------- training


def _eval_arrays(encoded, cap: int | None, seed: int) -> dict[str, np.ndarray]:
    n = len(encoded)
    if cap is not None and n > cap:
        idx = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
        return rdata.to_arrays(encoded, idx)
    return rdata.to_arrays(encoded)


def _check_experiment(workdir: Path, spec: dict) -> None:
    """A workdir holds one experiment: rerunning with other settings would mix members."""
    path = workdir / RM_FILE
    if not path.is_file():
        return
    old = read_json(path, "reward-model workdir")
    for key in ("init_from", "data", "model", "tokenizer", "mode", "num_steps", "batch_size"):
        if old.get(key) != spec.get(key):
            raise UserError(
                f"{workdir} holds a reward-model experiment with another {key} "
                f"({old.get(key)!r} vs {spec.get(key)!r}); use a fresh --workdir"
            )
    old_members = {m["index"]: m for m in old["members"]}
    for m in spec["members"]:
        if m["index"] in old_members and old_members[m["index"]] != m:
            raise UserError(
                f"{workdir}: member m{m['index']} was trained with other settings "
                f"({old_members[m['index']]} vs {m}); use a fresh --workdir"
            )


@gin.configurable
def train_rms(
    workdir: str | os.PathLike,
    init_from: str | os.PathLike | None = None,
    num_members: int = 4,
    mode: str = "sequential",
    members: Sequence[int] | None = None,
    num_steps: int = 200,
    batch_size: int = 32,
    probe_steps: int = 300,
    probe_learning_rate: float = 0.05,
    probe_l2: float = 1e-3,
    probe_max_pairs: int | None = 4096,
    center_coef: float = 0.0,
    eval_batch_size: int = 64,
    max_validation_pairs: int | None = 512,
    merge: bool = True,
    progress: bool = True,
) -> dict:
    """Trains the WARM members of `workdir` (module docstring) and writes their average.

    `members`: indices to train in this job (sequential mode), default all. Completed members are
    skipped and interrupted ones resume, so rerunning the same command finishes the work.
    Returns a summary: per member its settings and validation accuracy, and the WARM merge.
    """
    if mode not in MODES:
        raise UserError(f"train_rms.mode={mode!r}; choose from {list(MODES)}")
    if members is not None and mode == "vmapped":
        raise UserError("train_rms.members (a subset of members) needs mode='sequential'")
    workdir = Path(workdir)
    mesh = shd.make_mesh()
    config, tokenizer, sft_params = sft_lib.load_model(
        init_from, mesh=mesh, what="train_rms.init_from"
    )
    data_cfg = rdata.pair_data()
    if data_cfg.max_len > config.max_len:
        raise UserError(
            f"pair_data.max_len={data_cfg.max_len} exceeds the model's max_len={config.max_len}"
        )
    specs = mb.member_specs(num_members)
    todo = list(range(num_members)) if members is None else sorted(set(members))
    if any(not 0 <= i < num_members for i in todo):
        raise UserError(f"train_rms.members={list(todo)}: indices must be in [0, {num_members})")
    for s in specs:
        if s.init_step is not None and s.init_step not in sft_lib.sft_checkpoint_steps(init_from):
            raise UserError(
                f"member_specs.init_steps: {init_from} has no checkpoint at step {s.init_step}; "
                f"it has {sft_lib.sft_checkpoint_steps(init_from)}"
            )
    splits, responder = build_splits(workdir, data_cfg, tokenizer, init_from, mesh)
    fingerprint = tokenizer_fingerprint(tokenizer)
    experiment = {
        "init_from": str(Path(init_from).resolve()),
        "data": data_cfg.to_dict(),
        "model": config.to_dict(),
        "tokenizer": fingerprint,
        "mode": mode,
        "num_steps": num_steps,
        "batch_size": batch_size,
        "center_coef": center_coef,
        "members": [s.to_dict() for s in specs],
        "data_stats": splits.stats(),
    }
    _check_experiment(workdir, experiment)
    workdir.mkdir(parents=True, exist_ok=True)
    pretrain_lib.save_model_files(workdir, config, tokenizer)
    loop.save_json(workdir / RM_FILE, experiment)
    if responder is not None:
        responder.save()
    (workdir / "operative_config.gin").write_text(gin.config_str())

    train_arrays = rdata.training_arrays(splits.train)
    val_arrays = _eval_arrays(splits.validation, max_validation_pairs, data_cfg.seed)

    # 1. The shared linear-probed head.
    probe_path = workdir / PROBE_DIR
    if (probe_path / checkpoints.META_FILE).is_file():
        head = jax.device_get(checkpoints.load_params(probe_path))
        probe_info = checkpoints.load_metadata(probe_path)
    else:
        n = len(train_arrays["chosen_tokens"])
        idx = np.arange(n)
        if probe_max_pairs is not None and n > probe_max_pairs:
            idx = np.sort(np.random.default_rng(data_cfg.seed).choice(n, probe_max_pairs, False))
        sub = {k: v[idx] for k, v in train_arrays.items()}
        if probe_steps > 0:
            result = probe_lib.linear_probe(
                sft_params,
                config,
                sub,
                steps=probe_steps,
                learning_rate=probe_learning_rate,
                l2=probe_l2,
                batch_size=eval_batch_size,
            )
            head = result.head
            probe_info = {
                "train_accuracy": result.accuracy,
                "train_loss": result.loss,
                "pairs": len(idx),
                "steps": probe_steps,
                "l2": probe_l2,
            }
        else:
            head = jax.device_get(probe_lib.head_of(sft_params))
            probe_info = {"steps": 0}
        probe_info["validation_accuracy"] = ev.accuracy(
            ev.margins(probe_lib.with_head(sft_params, head), config, val_arrays, eval_batch_size)
        )
        checkpoints.save_params(probe_path, head, probe_info)

    # 2. Initial parameters: Baklava backbones (cached by step), the shared head.
    backbones: dict[int | None, PyTree] = {None: sft_params}

    def init_params(spec: mb.MemberSpec) -> PyTree:
        if spec.init_step not in backbones:
            backbones[spec.init_step] = sft_lib.load_model(
                init_from, step=spec.init_step, mesh=mesh
            )[2]
        return probe_lib.with_head(backbones[spec.init_step], head)

    loss_fn = losses.bt_loss_fn(config, center_coef=center_coef)
    param_axes = tm.param_logical_axes(config)
    meta = {
        "model": config.to_dict(),
        "tokenizer": fingerprint,
        "init_from": experiment["init_from"],
    }

    def finish_member(spec: mb.MemberSpec, params: PyTree, history: list[dict]) -> dict:
        last = [r for r in history if "loss" in r]
        train_metrics = last[-1] if last else {}
        if mode == "vmapped":
            prefix = f"{spec.name}/"
            train_metrics = {
                k[len(prefix) :]: v for k, v in train_metrics.items() if k.startswith(prefix)
            }
        h = {
            "member": spec.to_dict(),
            "name": spec.name,
            "model": config.to_dict(),
            "tokenizer": fingerprint,
            "init_from": experiment["init_from"],
            "num_steps": num_steps,
            "mode": mode,
            "train_metrics": train_metrics,
            "validation_accuracy": ev.accuracy(
                ev.margins(params, config, val_arrays, eval_batch_size)
            ),
            "complete": True,
        }
        return h

    def member_done(i: int) -> bool:
        p = member_dir(workdir, i) / HPARAMS_FILE
        return p.is_file() and bool(read_json(p, f"member m{i}").get("complete"))

    with gin.config_scope("rm"):
        if mode == "sequential":
            for i in todo:
                spec = specs[i]
                if member_done(i):
                    continue
                wd = member_dir(workdir, i)
                result = mb.train_member(
                    spec,
                    init_params(spec),
                    train_arrays,
                    loss_fn=loss_fn,
                    param_axes=param_axes,
                    workdir=wd,
                    num_steps=num_steps,
                    batch_size=batch_size,
                    mesh=mesh,
                    eval_fn=lambda p: {
                        "accuracy": ev.accuracy(ev.margins(p, config, val_arrays, eval_batch_size))
                    },
                    meta=meta,
                    progress=progress,
                )
                loop.save_json(
                    wd / HPARAMS_FILE, finish_member(spec, result.params, result.history)
                )
        elif not all(member_done(i) for i in todo):

            def eval_stacked(stacked):
                return {
                    f"m{i}/accuracy": ev.accuracy(
                        ev.margins(p, config, val_arrays, eval_batch_size)
                    )
                    for i, p in enumerate(mb.unstack(stacked))
                }

            result = mb.train_vmapped(
                specs,
                [init_params(s) for s in specs],
                train_arrays,
                loss_fn=loss_fn,
                param_axes=param_axes,
                workdir=workdir / VMAPPED_DIR,
                num_steps=num_steps,
                batch_size=batch_size,
                mesh=mesh,
                eval_fn=eval_stacked,
                meta=meta,
                progress=progress,
            )
            for spec, params in zip(specs, mb.unstack(result.params)):
                h = finish_member(spec, params, result.history)
                wd = member_dir(workdir, spec.index)
                checkpoints.save_params(wd, params, h)
                loop.save_json(wd / HPARAMS_FILE, h)

    summary = {
        "workdir": str(workdir),
        "probe": probe_info,
        "members": {},
        "warm": None,
    }
    for i in range(num_members):
        p = member_dir(workdir, i) / HPARAMS_FILE
        if p.is_file():
            h = read_json(p, f"member m{i}")
            summary["members"][f"m{i}"] = {
                **h["member"],
                "validation_accuracy": h.get("validation_accuracy"),
            }
    done = all(member_done(i) for i in range(num_members))
    if merge and done:
        summary["warm"] = merge_warm(workdir, mesh=mesh, batch_size=eval_batch_size)
    return summary


def merge_warm(
    workdir: str | os.PathLike,
    mesh=None,
    batch_size: int = 64,
    splits: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    member_margins: Mapping[str, np.ndarray] | None = None,
    loaded: tuple | None = None,
) -> dict:
    """Selects members (`warm_selection`), averages them and writes `W/warm` atomically."""
    workdir = Path(workdir)
    paths = _expected_members(workdir)
    config, _, params, _ = loaded or load_members(paths, mesh)
    selection = warm_selection()
    if splits is None:
        splits = {}
        if selection["select"] != "all":
            spec = read_json(workdir / RM_FILE, "reward-model workdir")
            _, tokenizer = pretrain_lib.load_model_files(workdir)
            data_cfg = rdata.PairDataConfig.from_dict(spec["data"])
            built, _ = build_splits(workdir, data_cfg, tokenizer, spec["init_from"], mesh)
            splits = {k: rdata.to_arrays(v) for k, v in built.eval_splits().items()}
    chosen, record = choose_members(params, config, splits, selection, member_margins, batch_size)
    names = [p.name for p in paths]
    merged = warm_lib.warm_average([params[i] for i in chosen], names=[names[i] for i in chosen])
    save_warm(workdir, merged, [names[i] for i in chosen], record)
    return {"members": [names[i] for i in chosen], "selection": record}


# ----------------------------------------------------------------------------- evaluation


@gin.configurable
def eval_rm(
    workdir: str | os.PathLike,
    member_dirs: Sequence[str] | None = None,
    lmc_pairs: Sequence[Sequence[int]] | None = None,
    num_lambdas: int = 11,
    subsets_per_m: int = 5,
    max_train_pairs: int | None = 1000,
    max_eval_pairs: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    seed_workdirs: Sequence[str] = (),
) -> dict:
    """Evaluates the members of `workdir` (or `member_dirs`), their ENS and their WARM average;
    writes `W/eval/results.json` and the plots, and `W/warm` if missing or stale.

    `lmc_pairs`: member pairs for the interpolation curves (default (0,1), (2,3), ...).
    `max_train_pairs` / `max_eval_pairs`: seeded subsets of the training / other splits.
    `seed_workdirs`: other workdirs of the same experiment run with other seeds, already
    evaluated; the spread over all runs goes to `W/eval/seeds.json` (`results["seeds"]`).
    """
    workdir = Path(workdir)
    if not (workdir / RM_FILE).is_file():
        raise UserError(f"{workdir} has no {RM_FILE}: not a train-rms workdir")
    spec = read_json(workdir / RM_FILE, "reward-model workdir")
    others = [
        read_json(Path(w) / EVAL_DIR / "results.json", f"eval_rm.seed_workdirs ({w})")
        for w in seed_workdirs
    ]
    paths = [Path(p) for p in member_dirs] if member_dirs else _expected_members(workdir)
    mesh = shd.make_mesh()
    config, fingerprint, params, hparams = load_members(paths, mesh)
    _, tokenizer = pretrain_lib.load_model_files(workdir)
    if tokenizer_fingerprint(tokenizer) != fingerprint:
        raise UserError(f"the members' tokenizer differs from {workdir}'s: cannot evaluate them")
    data_cfg = rdata.PairDataConfig.from_dict(spec["data"])
    built, _ = build_splits(workdir, data_cfg, tokenizer, spec["init_from"], mesh)
    splits = {}
    for name, enc in built.eval_splits().items():
        cap = max_train_pairs if name == "train" else max_eval_pairs
        splits[name] = _eval_arrays(enc, cap, seed)
    for name, arrays in splits.items():
        ev.subset_masks(name, arrays)  # an empty split stops here, before anything is written
    names = [p.name for p in paths]
    k = len(params)

    per = [{s: ev.margins(p, config, a, batch_size) for s, a in splits.items()} for p in params]
    member_margins = {s: np.stack([m[s] for m in per]) for s in splits}
    selection = warm_selection()
    chosen, record = choose_members(params, config, splits, selection, member_margins, batch_size)
    warm_params = warm_lib.warm_average(
        [params[i] for i in chosen], names=[names[i] for i in chosen]
    )

    pairs = (
        [tuple(p) for p in lmc_pairs]
        if lmc_pairs is not None
        else [(i, i + 1) for i in range(0, k - 1, 2)]
    )
    results = ev.evaluate_members(
        params,
        names,
        config,
        splits,
        selected=chosen,
        lmc_pairs=pairs,
        lambdas=np.linspace(0.0, 1.0, num_lambdas),
        subsets_per_m=subsets_per_m,
        seed=seed,
        batch_size=batch_size,
        member_margins=member_margins,
        warm_params=warm_params,
    )
    results["selection"] = record
    results["hparams"] = {n: h["member"] for n, h in zip(names, hparams)}
    results["data"] = spec["data"]
    results["workdir"] = str(workdir)

    if member_dirs is None and read_warm_members(workdir) != [names[i] for i in chosen]:
        save_warm(workdir, warm_params, [names[i] for i in chosen], record)
    out = workdir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    loop.save_json(out / "results.json", results)
    if others:
        results["seeds"] = ev.aggregate_runs([results, *others])
        results["seeds"]["workdirs"] = [str(workdir), *map(str, seed_workdirs)]
        loop.save_json(out / "seeds.json", results["seeds"])
    title = f"{data_cfg.task}: {k} members"
    ev.plot_lmc(results, out / "lmc.png", title=f"{title}, interpolation (WA vs ENS)")
    ev.plot_accuracy_vs_m(results, out / "accuracy_vs_m.png", title=f"{title}, accuracy vs M")
    return results


# ----------------------------------------------------------------------------- CLI


def _which(parser: argparse.ArgumentParser) -> str:
    name = parser.prog.split()[-1]
    return "eval-rm" if name == "eval-rm" else "train-rms"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `train-rms` or `eval-rm` (this module serves both; the parser's prog says which)."""
    which = _which(parser)
    parser.set_defaults(rm_command=which)
    if which == "eval-rm":
        add_gin_arguments(parser, workdir_default=None)
        parser.add_argument(
            "--member_dir",
            action="append",
            default=None,
            help="evaluate these member checkpoints instead of the workdir's (repeatable)",
        )
        parser.description = (
            "Evaluate the reward models of a train-rms workdir: accuracy of each member (ind), of "
            "their prediction ensemble (ENS) and of their weight average (WARM) on the training "
            "pairs (clean / corrupted), ID validation and every OOD split; interpolation curves "
            "between members; accuracy vs number of members. Writes WORKDIR/eval/results.json and "
            "PNG plots (and WORKDIR/warm if missing). Without --gin_file, reads the gin settings "
            "saved by train-rms in WORKDIR/operative_config.gin."
        )
        return
    add_gin_arguments(parser, workdir_default="runs/warm")
    parser.add_argument(
        "--init_from", default=None, help="the SFT (or pretrain) workdir every member starts from"
    )
    parser.add_argument(
        "--member",
        type=int,
        action="append",
        default=None,
        help="train only this member (repeatable; sequential mode): split the work across jobs",
    )
    parser.description = (
        "Train M reward models for WARM: a linear-probed head shared by all, then Bradley–Terry "
        "fine-tuning of each member with diverse seeds / data order, learning rate, dropout and "
        "(Baklava) SFT checkpoints; sequentially or all together vmapped (train_rms.mode). "
        "Writes WORKDIR/members/m<i>/ and the WARM average WORKDIR/warm. Without --gin_file "
        "uses experiments/warm_oracle. Rerunning resumes."
    )


def _parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    from warm_jax import config as cfg

    cfg.parse(
        files,
        bindings,
        extra_modules=[
            "warm_jax.reward.data",
            "warm_jax.reward.members",
            "warm_jax.experiments.reward_models",
        ],
    )


def run(args: argparse.Namespace) -> int:
    if getattr(args, "rm_command", "train-rms") == "eval-rm":
        files = list(args.gin_file)
        saved = Path(args.workdir) / "operative_config.gin"
        if not files and saved.is_file():
            # The experiment's own settings (eval_rm.*, warm_selection.*) unless told otherwise.
            files = [str(saved)]
        _parse_gin(files, args.gin_bindings)
        results = eval_rm(args.workdir, member_dirs=args.member_dir)
        print(ev.format_table(results))
        if "seeds" in results:
            print(f"over {results['seeds']['runs']} runs (mean ± std):")
            for sub, r in results["seeds"]["table"].items():
                cells = "  ".join(
                    f"{k} {100 * r[k]['mean']:.1f} ± {100 * r[k]['std']:.1f}"
                    for k in ("ind", "ens", "warm")
                )
                print(f"  {sub:<28}{cells}")
        print(f"selected for WARM: {', '.join(results['selected'])}")
        print(f"results and plots in {Path(args.workdir) / EVAL_DIR}")
        return 0
    _parse_gin(args.gin_file or ["experiments/warm_oracle"], args.gin_bindings)
    kwargs: dict[str, Any] = {}
    if args.init_from is not None:
        kwargs["init_from"] = args.init_from
    if args.member is not None:
        kwargs["members"] = args.member
    summary = train_rms(args.workdir, **kwargs)
    p = summary["probe"]
    if "train_accuracy" in p:
        print(
            f"linear probe: train accuracy {100 * p['train_accuracy']:.1f}%, "
            f"validation {100 * p['validation_accuracy']:.1f}%"
        )
    for name, m in summary["members"].items():
        print(
            f"{name}: lr {m['learning_rate']:.2g} dropout {m['dropout_rate']:.2f} "
            f"data_seed {m['data_seed']} init_step {m['init_step']}   "
            f"validation accuracy {100 * m['validation_accuracy']:.1f}%"
        )
    if summary["warm"]:
        print(f"WARM of {', '.join(summary['warm']['members'])} in {Path(args.workdir) / WARM_DIR}")
    else:
        print("WARM not written yet: some members are still to be trained")
    return 0
