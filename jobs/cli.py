"""The `gss` command line."""

from __future__ import annotations

import argparse
import dataclasses


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


def cmd_demo(args: argparse.Namespace) -> None:
    from jobs.demo import DemoConfig, run_demo

    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(DemoConfig)}}
    run_demo(DemoConfig(**{k: v for k, v in overrides.items() if v is not None}))


def _config(args: argparse.Namespace):
    """CONFIG (a YAML file, optional) followed by key.sub=value overrides."""
    from pipeline.config import ConfigError, load_config

    words = list(args.config_and_overrides)
    path = words.pop(0) if words and "=" not in words[0] else None
    try:
        return load_config(path, words)
    except ConfigError as e:
        raise SystemExit(f"gss: {e}") from None


def cmd_prepare(args: argparse.Namespace) -> None:
    from pipeline.prepare import prepare_stage

    prepare_stage(_config(args))


def cmd_train(args: argparse.Namespace) -> None:
    from pipeline.train import train_stage

    train_stage(_config(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gss", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small model on real local text, evaluate it longer, sample")
    demo.add_argument("--preset", help="a small-* preset (default small-gss)")
    demo.add_argument("--corpus", help="text files to read: a folder or a glob (default: see `gss demo -h`)")
    demo.add_argument("--steps", type=int)
    demo.add_argument("--seq-len", dest="seq_len", type=int)
    demo.add_argument("--batch-size", dest="batch_size", type=int)
    demo.add_argument("--ssm-kernel", dest="ssm_kernel", choices=["fft", "chunked"])
    demo.set_defaults(func=cmd_demo)

    prepare = commands.add_parser(
        "prepare", help="tokenize and pack a corpus into Parquet shards (Ray Data)",
        description="Train (or take) a SentencePiece tokenizer, tokenize and pack a corpus into Parquet shards.",
    )
    prepare.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [key.sub=value ...]")
    prepare.set_defaults(func=cmd_prepare)

    train = commands.add_parser(
        "train", help="train a model on prepared shards (Ray Train; cpu, cuda or xla), tracked in MLflow",
        description="Train on the shards `gss prepare` wrote for the same data config; re-running resumes.",
    )
    train.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [key.sub=value ...]")
    train.set_defaults(func=cmd_train)

    params = commands.add_parser("params", help="parameter counts of the model presets")
    params.add_argument("presets", nargs="*")
    params.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
