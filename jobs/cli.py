"""The `gss` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

Command = Callable[[argparse.Namespace], None]  # a cmd_* function below


def cmd_params(args: argparse.Namespace) -> None:
    import torch

    from models import PRESETS, build_model

    print(f"{'preset':<20} {'arch':<12} {'layers':>6} {'parameters':>12}")
    for name in args.presets or PRESETS:
        if name not in PRESETS:
            raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        cfg = PRESETS[name]
        with torch.device("meta"):  # count without allocating
            count = build_model(cfg).num_parameters()
        print(f"{name:<20} {cfg.arch:<12} {cfg.n_layers:>6} {count / 1e6:>11.1f}M")


def _config_words(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """CONFIG (a YAML file, optional) followed by key.sub=value overrides."""
    words = list(args.config_and_overrides)
    return (words.pop(0) if words and "=" not in words[0] else None), words


def _config(args: argparse.Namespace):
    """The command's config, checked whole; from here on the libraries log to <root>/logs/gss.log."""
    from pipeline.config import load_config
    from pipeline.logs import route_library_logs
    from pipeline.storage import check_writable

    path, overrides = _config_words(args)
    if args.command == "run" and not path:
        from jobs.run import local_config

        cfg = local_config(overrides)  # no CONFIG: the README's main job on local text
    else:
        cfg = load_config(path, overrides)
    if args.command not in ("generate", "export"):  # every other command writes under root: fail now, not after an hour
        check_writable(cfg.root)
    route_library_logs(cfg.root)
    args.root = cfg.root  # for main() to name the storage in an error
    return cfg


def cmd_prepare(args: argparse.Namespace) -> None:
    from pipeline.prepare import prepare_stage

    prepare_stage(_config(args))


def cmd_train(args: argparse.Namespace) -> None:
    from pipeline.train import train_stage

    train_stage(_config(args))


def cmd_eval(args: argparse.Namespace) -> None:
    from pipeline.evaluate import eval_stage

    eval_stage(_config(args))


def cmd_run(args: argparse.Namespace) -> None:
    from jobs.run import run_pipeline

    run_pipeline(_config(args))


def cmd_compare(args: argparse.Namespace) -> None:
    from jobs.compare import compare

    compare(_config(args), args.runs, split=args.split, metric=args.metric, out=args.out)


def cmd_reeval(args: argparse.Namespace) -> None:
    from jobs.reeval import reeval

    reeval(_config(args))


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from models.decoding import cast_for_decoding
    from pipeline.dataset import dataset_dir, read_tokenizer
    from pipeline.evaluate import load_model
    from pipeline.tracking import Tracking, default_model_uri

    cfg = _config(args)
    tokenizer = read_tokenizer(dataset_dir(cfg))  # a clear error if the dataset is not there
    tracking = Tracking.of(cfg)  # where the registered model is
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": torch.bfloat16 if device.type == "cuda"
             else torch.float32}[args.dtype]  # fmt: skip
    model = cast_for_decoding(load_model(default_model_uri(cfg), tracking).model.eval().to(device), dtype)
    torch.manual_seed(args.seed)
    tokens = [tokenizer.eod_id] + tokenizer.sp.encode(args.prompt)  # a document starts after </s>
    shown = tokenizer.decode(tokens)
    if not args.eager:
        print(f"[generate] compiling the decoding step for {device.type} (once per model shape; Inductor caches it "
              "for later runs; --eager skips it)", file=sys.stderr, flush=True)  # fmt: skip
    print(shown, end="", flush=True)
    prompt = torch.tensor([tokens], device=device)
    for token in model.stream(prompt, args.max_new_tokens, args.temperature, args.top_k, fast=not args.eager):
        tokens.append(int(token[0]))
        text = tokenizer.decode(tokens)  # the whole text: a piece's leading space survives only mid-text
        print(text[len(shown):], end="", flush=True)
        shown = text
    print()


def cmd_export(args: argparse.Namespace) -> None:
    from jobs.export import export

    generate = build_parser()[1]["generate"]
    sampling = {"do_sample": True, "temperature": generate.get_default("temperature"),
                "top_k": generate.get_default("top_k")}  # `gss generate`'s defaults
    export(_config(args), args.model_uri, args.out_dir, force=args.force, sampling=sampling)


def cmd_sweep(args: argparse.Namespace) -> None:
    from jobs.sweep import sweep

    result = sweep(args.sweep, args.overrides, args.only or [])
    if result["failed"]:
        raise SystemExit(f"gss sweep: {len(result['failed'])} cell(s) failed (listed above); the others are done")


def cmd_submit(args: argparse.Namespace) -> None:
    from jobs.submit import submit_main

    submit_main(args, [c for c in command_names() if c != "submit"])


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `gss` parser, and its subcommands' parsers by name (argparse has no public way from one to the others)."""
    parser = argparse.ArgumentParser(prog="gss", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    subparsers: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, func: Command, **text: str) -> argparse.ArgumentParser:
        sub = subparsers[name] = commands.add_parser(name, **text)
        sub.set_defaults(func=func)
        return sub

    def staged(name: str, help: str, description: str, func: Command) -> argparse.ArgumentParser:
        sub = command(name, func, help=help, description=description)
        sub.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [key.sub=value ...]")
        return sub

    staged("prepare", "tokenize and pack a corpus into Parquet shards (Ray Data)",
           "Train (or take) a SentencePiece tokenizer, tokenize and pack a corpus into Parquet shards.", cmd_prepare)
    staged("train", "train a model on prepared shards (Ray Train; cpu, cuda or xla), tracked in MLflow",
           "Train on the shards `gss prepare` wrote for the same data config; re-running resumes.", cmd_train)
    staged("eval", "perplexity against evaluation length (zero-shot beyond the training length), to MLflow",
           "Score a model (eval.model: a checkpoint folder or an MLflow model URI; default: this run's registered "
           "model) on eval.splits at eval.lengths: token and word-level perplexity, bits per byte, a plot.", cmd_eval)
    staged("run", "prepare -> train -> eval under one MLflow parent run; complete stages are skipped",
           "Without CONFIG: the main job on local text (../shared/corpora when present, else the Python standard "
           "library's source), offline, in a few minutes on a CPU.", cmd_run)
    compare = staged("compare", "compare evaluated runs: a table and a plot of perplexity against length",
                     "From the MLflow store alone: every finished eval run of the experiment, or --runs.", cmd_compare)
    compare.add_argument("--runs", nargs="*", default=[], help="eval runs or `gss run` parent runs (ids)")
    compare.add_argument("--split", default="", help="default: the first of eval.splits")
    compare.add_argument("--metric", default="token_ppl", help="token_ppl | word_ppl | bits_per_byte")
    compare.add_argument("--out", default="", help="folder for compare.md/.csv/.png (default <root>/compare/...)")
    staged("reeval", "evaluate registered models that lack results for the current suite (idempotent)",
           "For every registered model's `current` version trained with this dataset's tokenizer, evaluate the "
           "(split, length) pairs no finished eval run has; nothing when all are there.", cmd_reeval)
    generate = staged("generate", "sample text from a model with recurrent decoding",
                      "The model is eval.model (default: this run's registered model); the tokenizer is the "
                      "dataset's.", cmd_generate)
    generate.add_argument("--prompt", default="The ")
    generate.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", dest="top_k", type=int, default=40)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                          help="the weights' dtype while decoding (the SSMs stay float32); auto: bf16 on a GPU, fp32 "
                               "on a CPU (bf16 steps are about 2x faster on CPUs with native bf16: BENCHMARKS.md "
                               "section 11)")
    generate.add_argument("--eager", action="store_true",
                          help="run the eager step (the reference), not the compiled one (and its CUDA graph)")

    export = command(
        "export", cmd_export, help="write a Hugging Face model folder (transformers, trust_remote_code) for a model",
        description="MODEL_URI: models:/name/version, models:/name@current, or a checkpoint folder (local or gs://; "
                    "its tokenizer is CONFIG's dataset's). CONFIG and overrides say where MLflow and the data are.")
    export.add_argument("model_uri", metavar="MODEL_URI")
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [key.sub=value ...]")
    export.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")

    sweep = command(
        "sweep", cmd_sweep,
        help="a base config x the axes to vary: every cell a `gss run` on the cluster, then one comparison",
        description="SWEEP.yaml names a base config, overrides for every cell and the axes to vary (see "
                    "configs/sweep-miniature.yaml). Datasets are prepared once; cells run side by side as the "
                    "cluster's resources allow; finished cells are skipped on a re-run; a failed cell does not stop "
                    "the others.")
    sweep.add_argument("sweep", metavar="SWEEP.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="key.sub=value", help="for every cell, after the sweep's own")
    sweep.add_argument("--only", action="append", metavar="AXIS=VALUE",
                       help="run only the cells with this value (repeatable: all must hold); the summary still "
                            "covers every finished cell of the sweep under root")

    submit = command(
        "submit", cmd_submit, help="submit a gss command to a Ray cluster (Ray Jobs API); follow, status, logs, stop",
        description="gss submit [--address URL] [--no-wait] -- gss <command> [CONFIG] [key=value ...]; "
                    "or --status/--logs/--stop JOB_ID. The project, MLflow and storage settings travel with it.")
    submit.add_argument("--address", default="", help="the cluster's dashboard URL (default $RAY_ADDRESS, "
                        "else http://127.0.0.1:8265: a tunnel from `ray dashboard ray_cluster.yaml`)")
    submit.add_argument("--no-wait", dest="wait", action="store_false", help="return after submitting")
    submit.add_argument("--status", metavar="JOB_ID")
    submit.add_argument("--logs", metavar="JOB_ID")
    submit.add_argument("--stop", metavar="JOB_ID")
    submit.add_argument("command", nargs=argparse.REMAINDER, help="-- gss <command> ...")

    params = command("params", cmd_params, help="parameter counts of the model presets")
    params.add_argument("presets", nargs="*")
    return parser, subparsers


def command_names() -> list[str]:
    """The `gss` subcommands."""
    return list(build_parser()[1])


def main(argv: list[str] | None = None) -> None:
    from jobs.export import ExportError
    from pipeline.cluster import ClusterError
    from pipeline.config import ConfigError
    from pipeline.dataset import DatasetError
    from pipeline.evaluate import EvalError
    from pipeline.sources import SourceError
    from pipeline.storage import StorageError, explain, storage_failure
    from pipeline.train import TrainingError

    args = build_parser()[0].parse_args(argv)
    errors = (ConfigError, SourceError, StorageError, DatasetError, TrainingError, EvalError, ExportError,
              ClusterError)
    try:
        args.func(args)
    except errors as e:  # say what to do
        raise SystemExit(f"gss {args.command}: {e}") from None
    except Exception as e:
        failure = storage_failure(e)  # the storage went away mid-command, after its client's retries
        if failure is None:
            raise
        raise SystemExit(f"gss {args.command}: {explain(getattr(args, 'root', 'storage'), failure)}. What was "
                         "complete is kept and nothing half-written counts as done: run the same command again to "
                         "go on from there") from None


if __name__ == "__main__":
    main()
