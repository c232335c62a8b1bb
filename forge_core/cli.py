"""`forge` command line. Every option maps onto a ForgeConfig key; nothing here holds a default.

Frameworks (mlx, torch) and transformers are imported inside the commands that need them, so
`forge --help` works on a machine with neither backend installed.
"""

from __future__ import annotations

import sys

import click

from forge_core.adapters.calibration import QUANTIZERS
from forge_core.config_parse import choices
from forge_core.errors import ForgeError
from forge_core.friendly import friendly
from forge_core.methods import KINDS, METHODS, method
from forge_core.models.gguf_export import OUTTYPES as GGUF_OUTTYPES

# CLI option name -> config key. Options left unset (None) do not override the recipe.
TRAIN_OPTIONS = {
    "model": "model.path",
    "data": "data.train",
    "valid": "data.valid",
    "out": "train.out_dir",
    "steps": "train.steps",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "max_seq_len": "train.max_seq_len",
    "grad_checkpoint": "train.grad_checkpoint",
    "seed": "train.seed",
    "rank": "lora.rank",
    "alpha": "lora.alpha",
    "init": "lora.init",
    "dora": "lora.dora",
    "quant": "quant.bits",
    "train_on_prompt": "data.train_on_prompt",
    "packing": "data.packing",
    "skip_bad_rows": "data.skip_bad_rows",
    "backend": "backend",
}


def _quant_bits(ctx, param, value):
    if value is None:
        return None
    return 0 if value == "none" else int(value)


def _model_options() -> list:
    """The options every command that builds a model and reads data has (train / dpo / memory / eval)."""
    return [
        click.option("--config", "recipe", type=click.Path(dir_okay=False), help="YAML recipe (configs/*.yaml)."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. train.lr=1e-4."),
        click.option("--backend", type=click.Choice(choices("backend")), default=None),
        click.option("--model", help="HF dir, hub id, .gguf file or bundled name (see `forge models`)."),
        click.option("--data", type=click.Path(), help="Training data: JSONL file/dir or a datasets dir."),
        click.option("--valid", type=click.Path(), help="Validation data."),
        click.option("--batch-size", type=int),
        click.option("--max-seq-len", type=int),
    ]


def eval_options(f):
    """`forge eval`'s share of the config options: no training-only flags in its --help."""
    for opt in reversed(_model_options()):
        f = opt(f)
    return f


def config_options(f):
    """The options shared by train / dpo / memory: the model's and data's, and the training run's."""
    opts = [
        *_model_options(),
        click.option("--out", type=click.Path(), help="Run directory."),
        click.option("--steps", type=int),
        click.option("--epochs", type=float),
        click.option("--lr", type=float),
        click.option("--grad-accum", type=int),
        click.option("--grad-checkpoint/--no-grad-checkpoint", default=None),
        click.option("--seed", type=int),
        click.option("--rank", type=int),
        click.option("--alpha", type=float),
        click.option("--init", help="lora | pissa | pissa_niter_N"),
        click.option("--dora/--no-dora", default=None, help="DoRA: train a magnitude per output row too (QDoRA on a "
                     "quantized base)."),
        click.option("--quant", type=click.Choice(["none"] + [str(b) for b in choices("quant.bits") if b]),
                     callback=_quant_bits, help="Base weight bits."),
        click.option("--train-on-prompt/--no-train-on-prompt", default=None),
        click.option("--packing/--no-packing", default=None),
        click.option("--skip-bad-rows/--no-skip-bad-rows", default=None),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def build_from_cli(kw: dict, extra: dict | None = None, kind: str | None = None, resume: str | None = None):
    """The command's config. With `kind` (a training command): resolved once, as the run will use it
    (forge_core/run_config.py: the method's section, the adapter it continues, the run it resumes)."""
    from forge_core.config_parse import build_config
    from forge_core.run_config import resolve

    overrides = {TRAIN_OPTIONS[k]: kw.pop(k) for k in list(kw) if k in TRAIN_OPTIONS}
    overrides.update(extra or {})
    if kind is None:
        return build_config(kw.pop("recipe", None), kw.pop("sets", ()), overrides)
    return resolve(kind, kw.pop("recipe", None), kw.pop("sets", ()), overrides, resume)


def nproc_option(f):
    return click.option("--nproc", type=int, default=None, metavar="N",
                        help="Train data-parallel in N processes on this machine (mlx.launch / torchrun).")(f)


def _relaunch(nproc: int, cfg, resume: str | None) -> None:
    """--nproc N: the backend's launcher runs this same command line, minus --nproc, N times; this process exits
    as the ranks did. What can be checked before launching is (a run dir that already holds a run)."""
    from forge_core.relaunch import relaunch
    from forge_core.rundir import RunDir

    if not resume:
        RunDir(cfg.train.out_dir).check_free()

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    relaunch(nproc, cfg.backend, argv)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="forge-tune", prog_name="forge")
def cli():
    """Forge: fine-tune LLMs on your own machine (QPiSSA + LoRA; SFT, DPO, ORPO, SimPO, CPO, KTO, GRPO; MLX and CUDA)."""


@cli.command(help=method("sft").summary)
@config_options
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this directory exactly.")
@click.option("--force", is_flag=True, help="Launch even when the memory check says it will not fit.")
@nproc_option
@friendly
def train(resume, force, nproc, **kw):
    from forge_core.launch import launch

    cfg = build_from_cli(kw, kind="sft", resume=resume)
    if nproc and nproc > 1:
        _relaunch(nproc, cfg, resume)
    launch(cfg, kind="sft", resume=resume, force=force)


# The other methods: one command each, the same shape, built from their registry entries (forge_core/methods.py):
# their own options map onto their config section; --lr sets that section's lr.
def _method_options(m) -> list:
    opts = []
    for o in m.options:
        kw = {"help": o.help or None, "default": None}
        if o.choices:
            kw["type"] = click.Choice(choices(f"{m.section}.{o.key}"))
        else:
            kw["type"] = o.type
        if o.multiple:
            kw.update(multiple=True, default=())
        opts.append(click.option(o.flag, o.key, **kw))
    return opts


def _method_command(m):
    kind = m.kind

    def command(adapter, beta, resume, force, nproc, **kw):
        from forge_core.launch import launch

        extra = {f"{kind}.adapter": adapter, f"{kind}.beta": beta, f"{kind}.lr": kw.pop("lr")}
        for name in [k for k in kw if k not in TRAIN_OPTIONS and k not in ("recipe", "sets")]:
            value = kw.pop(name)
            extra[f"{kind}.{name}"] = (list(value) or None) if isinstance(value, tuple) else value  # repeatable
        cfg = build_from_cli(kw, extra, kind=kind, resume=resume)
        if nproc and nproc > 1:
            _relaunch(nproc, cfg, resume)
        launch(cfg, kind=kind, resume=resume, force=force)

    command.__doc__ = f"{method(kind).summary} (--lr sets {kind}.lr)"
    command = friendly(command)
    for opt in reversed([
        config_options,
        click.option("--adapter", type=click.Path(), help="Continue from this SFT adapter"
                     + (" (also the reference)." if method(kind).reference else ".")),
        click.option("--beta", type=float),
        *_method_options(m),
        click.option("--resume", type=click.Path(file_okay=False)),
        click.option("--force", is_flag=True),
        nproc_option,
    ]):
        command = opt(command)
    return cli.command(name=kind)(command)


for _method in METHODS.values():
    if _method.section:  # sft (no section of its own) is `forge train`, above
        _method_command(_method)


@cli.command()
@click.option("--model", default=None, help="Base model (default: the run's or the bundled one).")
@click.option("--adapter", type=click.Path(), help="Adapter dir or run dir.")
@click.option("--prompt", "-p", required=True)
@click.option("--system", default=None,
              help="System message (default: the one every training row of the run shared; '' for none).")
@click.option("--max-tokens", type=int, default=None)
@click.option("--temp", type=float, default=0.0)
@click.option("--backend", type=click.Choice(choices("backend")), default=None)
@friendly
def generate(model, adapter, prompt, system, max_tokens, temp, backend):
    """Generate from base + adapter with the chat template (streams)."""
    from forge_core.eval.commands import run_generate

    run_generate(model=model, adapter=adapter, prompt=prompt, system=system, max_tokens=max_tokens,
                 temp=temp, backend=backend)


@cli.command(name="eval")
@eval_options
@click.option("--adapter", type=click.Path(), help="Adapter dir or run dir (none: the base model).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--system", default=None,
              help="System message for rows without one (default: the one every training row of the run shared; "
                   "'' for none).")
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help="A text file: its sliding-window perplexity (windows of --max-seq-len tokens; default: the run's).")
@click.option("--stride", type=int, default=None, help="--text: tokens between window starts (default: half a window).")
@click.option("--lm-eval", "lm_eval", default=None, metavar="TASKS",
              help="lm-evaluation-harness tasks, comma-separated (forge ships forge_mc; needs forge-tune[eval]).")
@click.option("--lm-eval-include", type=click.Path(file_okay=False), default=None, help="A dir of your own task YAMLs.")
@click.option("--lm-eval-limit", type=float, default=None, help="Rows per task (a fraction when < 1).")
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples (default: the task's).")
@friendly
def eval_(adapter, as_json, system, text, stride, lm_eval, lm_eval_include, lm_eval_limit, num_fewshot, **kw):
    """Held-out loss / perplexity and the task metric; a text file's perplexity; lm-eval tasks."""
    from forge_core.eval.commands import run_eval

    extra = {"eval.text": text, "eval.stride": stride, "eval.lm_eval": lm_eval, "eval.lm_eval_include": lm_eval_include,
             "eval.lm_eval_limit": lm_eval_limit, "eval.lm_eval_fewshot": num_fewshot}
    window = kw["max_seq_len"]  # None: the run's own train.max_seq_len when --adapter names one
    run_eval(build_from_cli(kw, {k: v for k, v in extra.items() if v is not None}), adapter=adapter, as_json=as_json,
             system=system, max_seq_len=window)


@cli.command()
@click.argument("src", type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(["peft", "merged", "mlx", "gguf"]), required=True)
@click.option("--out", required=True, type=click.Path())
@click.option("--base", default=None, help="Base model (default: the one recorded in forge.json).")
@click.option("--quantize", type=click.Choice(QUANTIZERS), is_flag=False, flag_value="rtn", default=None,
              help="merged: quantize the merged weights afterwards, an mlx-lm model at the run's bits: rtn (plain "
                   "rounding, the bare flag), awq, gptq or dwq (mlx-lm's, calibrated on the run's training rows).")
@click.option("--calib", default=None, metavar="DATA", help="awq / gptq / dwq: calibrate on these rows instead.")
@click.option("--dtype", type=click.Choice(["float32", "base", "bfloat16", "float16"]), default="float32",
              help="merged: dtype of the written weights (base = the base checkpoint's own).")
@click.option("--outtype", type=click.Choice(GGUF_OUTTYPES), default="f16",
              help="gguf: the tensor type of the file (from the exact float32 merge).")
@click.option("--push-to-hub", default=None, metavar="REPO")
@friendly
def export(src, fmt, out, base, quantize, calib, dtype, outtype, push_to_hub):
    """Export a run or adapter: PEFT dir, merged HF checkpoint, mlx-lm adapter, or GGUF (llama.cpp/Ollama)."""
    from forge_core.adapters.export import export as do_export

    do_export(src, fmt=fmt, out=out, base=base, quantize=quantize or False, push_to_hub=push_to_hub, dtype=dtype,
              outtype=outtype, calib=calib)


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path())
@click.option("--method", type=click.Choice(["slerp", "linear", "ties"]), default="slerp")
@click.option("--t", "t", multiple=True, metavar="[FILTER=]VALUES",
              help="slerp: 0 = the first model, 1 = the second; a comma list is a gradient over the layers; "
                   "FILTER= gives tensors whose name contains FILTER their own (e.g. self_attn=0,0.5,1).")
@click.option("--weight", "weights", type=float, multiple=True, help="linear / ties: one per model (default 1).")
@click.option("--base", default=None, help="ties: the model the others were fine-tuned from.")
@click.option("--density", type=float, default=0.5, help="ties: share of each delta kept (largest magnitudes).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32")
@friendly
def merge(models, out, method, t, weights, base, density, dtype):
    """Merge full checkpoints of one architecture (e.g. merged exports): SLERP, linear or TIES."""
    from forge_core.merge import merge as do_merge

    path = do_merge(list(models), out, method=method, t=list(t), weights=list(weights), base=base, density=density,
                    dtype=dtype)
    click.echo(f"wrote {path} ({method} of {len(models)} models)")


@cli.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--to", "to", type=click.Choice(["peft", "mlx"]), required=True)
@click.option("--base", default=None, help="Base model to check shapes against (optional).")
@friendly
def convert(src, dst, to, base):
    """Convert an adapter between mlx-lm and PEFT layouts (PiSSA -> plain rank-2r LoRA)."""
    from forge_core.adapters.convert import convert as do_convert

    do_convert(src, dst, to=to, base=base)


@cli.command()
@config_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--device-memory", default=None, help='Plan for another device, e.g. "24GB".')
@click.option("--method", type=click.Choice(KINDS), default=None, help="Plan this method's run (default sft).")
@click.option("--dpo", "is_dpo", is_flag=True, help="Same as --method dpo.")
@click.option("--nproc", type=int, default=1, metavar="N", help="Plan one of N data-parallel processes.")
@friendly
def memory(as_json, device_memory, method, is_dpo, nproc, **kw):
    """Estimate peak memory for a run and compare it with the device."""
    from forge_core.memory.plan import memory_command

    cfg = build_from_cli(kw, {"memory.device_memory": device_memory})
    memory_command(cfg, as_json=as_json, kind=method or ("dpo" if is_dpo else "sft"), nproc=max(1, nproc))


@cli.group(invoke_without_command=True)
@click.pass_context
@friendly
def models(ctx):
    """List model sources (the bundled model, cached imports)."""
    if ctx.invoked_subcommand is None:
        from forge_core.models.sources import print_models

        print_models()


@models.command("import-gguf")
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32")
@friendly
def import_gguf_cmd(src, out, dtype):
    """Write an HF-layout dir (safetensors + tokenizer + chat template) from a GGUF file or bundled name."""
    from forge_core.models.sources import import_gguf

    path = import_gguf(src, out, dtype=dtype)
    click.echo(f"wrote {path}")


@cli.group(invoke_without_command=True)
@click.pass_context
@friendly
def cache(ctx):
    """The init cache: PiSSA factors kept per base model (`ls`, the default; `rm`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(cache_ls)


@cache.command("ls")
@friendly
def cache_ls():
    """List the cached PiSSA factors: base, rank, init, size."""
    from forge_core.init_cache import print_entries

    print_entries()


@cache.command("rm")
@click.argument("ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@friendly
def cache_rm(ids, everything):
    """Remove cache entries by id (a unique prefix will do), or --all."""
    from forge_core.init_cache import remove

    if not ids and not everything:
        raise ForgeError("forge cache rm: name the entries (ids from `forge cache ls`) or pass --all")
    gone = remove(list(ids), everything)
    click.echo(f"removed {len(gone)} init cache entr{'y' if len(gone) == 1 else 'ies'}")


@cli.command()
@click.option("--config", "recipe", type=click.Path(dir_okay=False), default="configs/demo.yaml")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
@click.option("--backend", type=click.Choice(choices("backend")), default=None)
@friendly
def demo(recipe, sets, backend):
    """Fine-tune the bundled model on the demo data and show before/after."""
    from forge_core.demo import run_demo

    run_demo(recipe, sets, backend)


from forge_core.datagen.commands import data
from forge_core.serve.cli import router, serve

cli.add_command(data)
cli.add_command(serve)
cli.add_command(router)


def main():
    from forge_core import torch_free

    torch_free.for_this_process()  # an MLX command then runs without importing torch
    cli(prog_name="forge")


if __name__ == "__main__":
    main()
