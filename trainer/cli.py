"""The ``lowbit`` command: train, config, eval.

Imports stay inside the commands so ``lowbit --help`` starts fast and never loads torch, W&B,
DeepSpeed or bitsandbytes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lowbit.trainer.errors import EXIT_USER_ERROR, UserError
from lowbit.trainer.preemption import Preempted

EPILOG = """examples:
  lowbit recipes
  lowbit train configs/tiny.yaml train.max_steps=50
  lowbit train --nproc-per-node 2 configs/tiny.yaml
  lowbit config configs/quickstart.yaml train.lr=1e-4
  lowbit eval runs/tiny
  lowbit generate runs/tiny --prompt "Gentlemen of the Senate"
  lowbit export runs/qat_gguf_q4_0 --format gguf-q4_0 --out smollm2-q4_0.gguf
  lowbit export ~/models/my-llama --format compressed-tensors --out my-llama-w4a16 --ptq
  lowbit gptq configs/qat_w4a8.yaml --out smollm2-gptq-w4a8
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Train small low-bit LLMs: QAT, distillation, QLoRA, BitNet; export to packed formats.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # `deepspeed --module lowbit.trainer ...` inserts --local_rank=N before our arguments; the rank
    # itself is read from the environment (LOCAL_RANK), so the flag is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"lowbit {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    recipes = commands.add_parser("recipes", help="list the shipped recipes (configs/*.yaml), one line each")
    recipes.add_argument(
        "directory", nargs="?", default=None, help="a folder of recipes (default: lowbit's configs/)"
    )
    train = commands.add_parser("train", help="train from a YAML recipe (+ key=value overrides)")
    train.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="start N local processes through torch's elastic launcher (as torchrun does)",
    )
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="R",
        help="with --nproc-per-node: restart all processes up to R times when one fails; each restart "
        "resumes from the newest complete checkpoint",
    )
    train.add_argument("config", help="YAML recipe, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    show = commands.add_parser("config", help="print the resolved config as YAML")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    evaluate = commands.add_parser("eval", help="validation loss and perplexity of a model or run")
    evaluate.add_argument(
        "target",
        help="a YAML recipe, a run directory, a checkpoint directory, or a model (.gguf file or HF directory: "
        "give its text with data.val_files=[FILE])",
    )
    evaluate.add_argument("overrides", nargs="*", metavar="key=value")
    cache = commands.add_parser(
        "teacher-cache", help="store the teacher's top-k logits for the training data"
    )
    cache.add_argument("config")
    cache.add_argument("overrides", nargs="*", metavar="key=value")
    gen = commands.add_parser(
        "generate", help="a few completions from a run, checkpoint or model (fake quant on)"
    )
    gen.add_argument("source", help="a run directory, a checkpoint directory, a YAML recipe or a model path")
    gen.add_argument("--prompt", action="append", required=True, help="text to complete (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampled")
    gen.add_argument("--seed", type=int, default=0, help="for sampling")
    gen.add_argument(
        "--chat", action="store_true", help="send each prompt as a user turn of the chat template"
    )
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    gptq = commands.add_parser(
        "gptq",
        help="GPTQ-round a recipe's model onto its quant rules (a float model on the grid: PTQ or QAT start)",
    )
    gptq.add_argument("config", help="YAML recipe with a quant section (its model, data and rules)")
    gptq.add_argument("--out", required=True, help="output directory (a Hugging Face float model)")
    gptq.add_argument("--samples", type=int, default=128, help="calibration sequences from the training data")
    gptq.add_argument("--damp", type=float, default=0.01, help="added to the Hessian's diagonal, × its mean")
    gptq.add_argument("--no-act-order", dest="act_order", action="store_false",
                      help="round columns in their order (default: largest input energy first)")  # fmt: skip
    gptq.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    gptq.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    export = commands.add_parser("export", help="write a trained model in a packed low-bit format")
    export.add_argument(
        "source", help="a run directory, a checkpoint directory, a YAML recipe or a model path"
    )
    export.add_argument("--format", required=True, metavar="FORMAT",
                        help="gguf-q8_0, gguf-q4_0, gguf-q4_1, gguf-tq2_0, gguf-tq1_0, gguf-f16, "
                             "compressed-tensors, bitnet, bnb-nf4")  # fmt: skip
    export.add_argument("--out", required=True, help="output file (GGUF) or directory")
    export.add_argument("--ptq", nargs="?", const=True, default=False, metavar="SCHEME",
                        help="round-to-nearest quantize a float model first (the format's preset, or SCHEME)")  # fmt: skip
    export.add_argument("--float-type", default=None,
                        help="storage of tensors left in float: f16, bf16, f32 (default: f16 for GGUF, else the model's)")  # fmt: skip
    export.add_argument("--embedding-type", default=None, metavar="f16|bf16|f32|q8_0|q6_k",
                        help="GGUF: storage of the float token embeddings / untied head (default: what llama-quantize "
                             "picks for the file's type: in quantized files Q6_K for rows of whole 256-value blocks, "
                             "else Q8_0; the float type in f16 ones)")  # fmt: skip
    export.add_argument(
        "--tokenizer-pre", default=None, help="GGUF tokenizer.ggml.pre (llama.cpp pre-tokenizer)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    return parser


def _launch_local(nproc: int, config: str, overrides: list[str], max_restarts: int = 0) -> int:
    """Re-run ``lowbit train`` in ``nproc`` processes via torch.distributed.run (torchrun)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from lowbit.trainer.strategies.distributed import FRESH_STORE_PER_ROUND

    os.environ.setdefault(FRESH_STORE_PER_ROUND, "1")  # a restarted attempt never sees the last one's keys

    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}",
            "--module",
            "lowbit.trainer",
            "train",
            config,
            *overrides,
        ]
    )
    try:
        run(args)
    except ChildFailedError as error:
        codes = [failure.exitcode for failure in error.failures.values()]
        return EXIT_USER_ERROR if EXIT_USER_ERROR in codes else max(1, *codes)
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.nproc_per_node < 1:
        raise UserError("--nproc-per-node must be at least 1")
    if args.max_restarts < 0 or (args.max_restarts and args.nproc_per_node == 1):
        raise UserError("--max-restarts R (R >= 0) restarts the processes of --nproc-per-node N (N >= 2)")
    from lowbit.trainer.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors are reported before any heavy import
    if args.nproc_per_node > 1:
        return _launch_local(args.nproc_per_node, args.config, args.overrides, args.max_restarts)
    from lowbit.trainer.loggers import format_metrics
    from lowbit.trainer.loop import train

    result = train(cfg)
    if os.environ.get("RANK", "0") != "0":
        return 0
    if result["eval"]:
        print(f"final step {result['step']}: {format_metrics(result['eval'])}")
        if result["first_eval"]:
            before, after = result["first_eval"]["val_ppl"], result["eval"]["val_ppl"]
            print(f"validation perplexity: {before:.2f} before -> {after:.2f} after training")
    if cfg.export is not None:
        _export_after_training(cfg)
    return 0


def _export_after_training(cfg) -> None:
    """Run the recipe's ``export`` section on the finished run (its newest checkpoint).

    The default output, ``<run>/export/<format>``, belongs to the run and is replaced on a rerun;
    an explicit ``export.out`` is never overwritten.
    """
    from lowbit.trainer.export import FORMATS, export

    choice = cfg.export
    suffix = ".gguf" if choice.format in FORMATS and FORMATS[choice.format].single_file else ""
    default = Path(cfg.run.output_dir) / "export" / f"{choice.format}{suffix}"
    out = Path(choice.out) if choice.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        summary = export(Path(cfg.run.output_dir), choice.format, out, ptq=choice.ptq,
                         float_type=choice.float_type, overwrite=choice.out is None,
                         embedding_type=choice.embedding_type)  # fmt: skip
    except UserError as error:
        raise UserError(
            f"training finished and its checkpoint is saved, but the export failed: {error}. Retry with "
            f"`lowbit export {cfg.run.output_dir} --format {choice.format} --out PATH`"
        ) from None
    print(summary.table())


def _export(args: argparse.Namespace) -> int:
    from lowbit.trainer.export import export

    summary = export(
        Path(args.source), args.format, Path(args.out), ptq=args.ptq, overrides=args.overrides,
        float_type=args.float_type, tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite,
        embedding_type=args.embedding_type,
    )  # fmt: skip
    print(summary.table())
    return 0


def _gptq(args: argparse.Namespace) -> int:
    from lowbit.trainer.gptq_cli import run_gptq, summary

    report = run_gptq(args.config, args.overrides, Path(args.out), samples=args.samples, damp=args.damp,
                      act_order=args.act_order, overwrite=args.overwrite)  # fmt: skip
    print(summary(report, Path(args.out)))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lowbit.trainer.generate_cli import generate

    completions = generate(
        Path(args.source), args.prompt, args.overrides, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed, chat=args.chat,
    )  # fmt: skip
    for completion in completions:
        print(f"--- {completion.prompt!r} (+{completion.new_tokens} tokens)")
        print(completion.prompt + completion.text if not args.chat else completion.text)
    return 0


def _config(args: argparse.Namespace) -> int:
    from lowbit.trainer.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lowbit.trainer.evaluate_cli import evaluate_target, format_rows

    rows = evaluate_target(Path(args.target), args.overrides)
    if rows:
        print(format_rows(rows))
    return 0


def _teacher_cache(args: argparse.Namespace) -> int:
    from lowbit.trainer.config import load_config
    from lowbit.trainer.teacher_cache import build_cache

    cfg = load_config(args.config, args.overrides)
    summary = build_cache(cfg)
    print(f"teacher cache {cfg.teacher.cache}: {summary['tokens']:,} tokens, {summary['bytes'] / 2**20:.1f} MiB, "
          f"{summary['bytes_per_token']:.1f} bytes/token, {summary['seconds']:.1f}s")  # fmt: skip
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _recipes(args: argparse.Namespace) -> int:
    """Each recipe's file name and the first line of its header comment."""
    directory = Path(args.directory) if args.directory else Path(__file__).resolve().parents[1] / "configs"
    recipes = sorted(directory.glob("*.yaml")) if directory.is_dir() else []
    if not recipes:
        raise UserError(
            f"no recipes (*.yaml) in {directory}: the recipes ship in the repository's configs/ folder; "
            "give its path, e.g. `lowbit recipes path/to/lowbit/configs`"
        )
    width = max(len(recipe.name) for recipe in recipes)
    for recipe in recipes:
        print(f"{recipe.name.ljust(width)}  {_first_sentence(recipe)}")
    return 0


def _first_sentence(recipe: Path) -> str:
    """The first sentence of a recipe's leading ``#`` comment."""
    header = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(part for part in header if part)
    sentence = text.split(". ")[0].split(":  ")[0].rstrip(".")
    return sentence or "(no description)"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {
        "train": _train,
        "config": _config,
        "eval": _eval,
        "teacher-cache": _teacher_cache,
        "export": _export,
        "gptq": _gptq,
        "recipes": _recipes,
        "generate": _generate,
    }[args.command]
    try:
        return command(args)
    except UserError as error:
        print(f"lowbit {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"lowbit {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    """Console script: exit with ``main``'s code."""
    sys.exit(main())
