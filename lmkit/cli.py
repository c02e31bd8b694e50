"""`lmkit` command line: run / validate recipes, serve, evaluate and compare, list and materialize models.

User errors (`LmkitError`) print one clear message and exit with status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.table import Table

from lmkit.errors import LmkitError

console = Console(stderr=True)


def _cmd_run(args: argparse.Namespace) -> None:
    from lmkit.recipes import load_recipe, run_recipe

    run_recipe(load_recipe(args.recipe, args.overrides), resume=args.resume)


def _cmd_validate(args: argparse.Namespace) -> None:
    from lmkit.config import to_yaml
    from lmkit.recipes import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(to_yaml(recipe), end="")
    console.print(f"[green]{args.recipe} is valid[/] (method {recipe.method}).")


def _cmd_methods(args: argparse.Namespace) -> None:
    from lmkit.config import documented_keys
    from lmkit.recipes import get_method, method_names

    names = [args.name] if args.name else method_names()
    out = Console()
    for name in names:
        method = get_method(name, "lmkit methods")
        table = Table(title=f"method {name}: {method.description}", title_justify="left")
        for column in ("key", "type", "default", "description"):
            table.add_column(column, overflow="fold")
        for row in documented_keys(method.recipe):
            table.add_row(*row)
        out.print(table)
        if method.requires:
            extras = ", ".join(sorted(set(method.requires.values())))
            out.print(f"needs the extra(s): {extras}\n")


def _cmd_data_preview(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lmkit.config import read_yaml
    from lmkit.data.preview import print_preview
    from lmkit.errors import ConfigError

    if "method" in read_yaml(args.file):
        from lmkit.data import DataSpec, load_data
        from lmkit.recipes import load_recipe

        recipe = load_recipe(args.file, args.overrides)
        data = getattr(recipe, "data", None)
        if not isinstance(data, DataSpec):
            raise ConfigError(
                f"{args.file}: method {recipe.method} reads no data section; nothing to preview."
            )
        train, evaluation = load_data(data)
        splits = {"train": train, "eval": evaluation}
    else:  # an eval task file (evals/tasks/*.yaml)
        from lmkit.evals.config import load_local_task
        from lmkit.evals.quality import task_examples

        task = load_local_task(Path(args.file))
        splits = {f"eval task {task.name}": task_examples(task, 0)}
    print_preview(Console(), splits, args.count)


def _cmd_models(args: argparse.Namespace) -> None:
    from lmkit.loader import ALIASES, cache_root, list_materialized

    aliases = Table(title="Model aliases")
    for column in ("alias", "kind", "description"):
        aliases.add_column(column)
    for name, alias in sorted(ALIASES.items()):
        aliases.add_row(name, type(alias).__name__, alias.description)
    cached = Table(title=f"Materialized copies in {cache_root() / 'models'}")
    for column in ("path", "source", "dtype", "size (MB)", "created"):
        cached.add_column(column)
    for row in list_materialized():
        cached.add_row(row["path"], row["source"], row["dtype"], str(row["size_mb"]), row["created"])
    out = Console()
    out.print(aliases)
    out.print(cached)


def _cmd_materialize(args: argparse.Namespace) -> None:
    from lmkit.loader import ModelSpec, materialize

    path = materialize(ModelSpec(source=args.source, dtype=args.dtype), force=args.force)
    print(path)


def _cmd_serve(args: argparse.Namespace) -> None:
    import shlex

    from lmkit.serving import ServerProcess, build_command, load_serve_config
    from lmkit.serving.launch import prepare_model_dir

    config = load_serve_config(args.config, args.overrides)
    if args.dry_run:
        argv, env = build_command(config, prepare_model_dir(config))
        shown = {k: ("***" if k == "VLLM_API_KEY" else v) for k, v in env.items()}
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items()), shlex.join(argv))
        return
    names = [config.served_model_name] + [a.name for a in config.model.adapters]
    # Ctrl-C/SIGTERM stop it (return); a dead engine is restarted per `restart`, else EngineDied (exit 2)
    ServerProcess(config).run(
        on_ready=lambda: console.print(
            f"[green]Serving[/] {', '.join(names)} at {config.base_url}/v1 (Ctrl-C stops it)."
        ),
        log=lambda message: console.print(f"[yellow]{message}[/]", highlight=False, soft_wrap=True),
    )


def _cmd_eval(args: argparse.Namespace) -> None:
    from lmkit.evals.config import load_suite
    from lmkit.evals.runner import run_suite

    suite = load_suite(args.suite, args.overrides)
    run_suite(suite)


def _cmd_compare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lmkit.evals.compare import compare_runs

    runs = [Path(r) for r in args.runs]
    output = (
        Path(args.output)
        if args.output
        else runs[0].parent / ("compare-" + "-vs-".join(r.name for r in runs))
    )
    compare_runs(runs, output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe (YAML) with optional key.path=value overrides")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", help="e.g. train.max_steps=10 model.quantization=nf4")
    run.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("validate", help="check a recipe and print it resolved, without running it")
    check.add_argument("recipe")
    check.add_argument("overrides", nargs="*")
    check.set_defaults(func=_cmd_validate)

    serve = sub.add_parser("serve", help="serve a model and its adapters with vLLM's OpenAI server")
    serve.add_argument("config", help="serve/*.yaml")
    serve.add_argument("overrides", nargs="*", help="e.g. port=8001 engine.max_model_len=4096")
    serve.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")
    serve.set_defaults(func=_cmd_serve)

    evaluate = sub.add_parser("eval", help="evaluate a model or endpoint: quality (lm-eval), speed, memory")
    evaluate.add_argument("suite", help="evals/*.yaml")
    evaluate.add_argument("overrides", nargs="*", help="e.g. limit=20 target.model.quantization=nf4")
    evaluate.set_defaults(func=_cmd_eval)

    compare = sub.add_parser("compare", help="put eval runs side by side (table, JSON, plot)")
    compare.add_argument("runs", nargs="+", help="output directories of lmkit eval runs")
    compare.add_argument("--output", help="where to write the comparison (default: next to the first run)")
    compare.set_defaults(func=_cmd_compare)

    methods = sub.add_parser("methods", help="list the methods and every recipe key each accepts, documented")
    methods.add_argument("name", nargs="?", help="one method (default: all)")
    methods.set_defaults(func=_cmd_methods)

    data = sub.add_parser("data", help="look at a recipe's (or eval task file's) data").add_subparsers(
        dest="data_command", required=True
    )
    preview = data.add_parser("preview", help="the first rendered examples and the label distribution")
    preview.add_argument("file", help="a recipe (recipes/*.yaml) or an eval task file (evals/tasks/*.yaml)")
    preview.add_argument("overrides", nargs="*", help="e.g. data.sources[0].limit=100 (recipes only)")
    preview.add_argument("-n", "--count", type=int, default=5, help="examples shown per split")
    preview.set_defaults(func=_cmd_data_preview)

    models = sub.add_parser("models", help="list model aliases and materialized copies in the cache")
    models.set_defaults(func=_cmd_models)

    mat = sub.add_parser(
        "materialize", help="write a model source as a safetensors dir (for vLLM); prints it"
    )
    mat.add_argument("source", help="alias, local dir, .gguf file or hub id")
    mat.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    mat.add_argument("--force", action="store_true", help="rebuild even if a cached copy exists")
    mat.set_defaults(func=_cmd_materialize)
    return parser


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes warns at import that an optional hub-downloaded CPU kernel is missing; its own
    # fallback kernel is used instead, so the warning only confuses users.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LmkitError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
