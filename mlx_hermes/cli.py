"""The `mlx-hermes` command: a thin layer over the Python API."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import click

from . import __version__
from .errors import HermesError
from .formats import DTYPES, GROUP_SIZES, OFFERED_BITS, RECIPES

_MODEL_HELP = "model folder or Hugging Face repo id"


def _choices(values) -> list[str]:
    return [str(v) for v in values]


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that cleanup runs as on Ctrl-C.
    Not an Exception: nothing on the way may swallow it."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


class _Group(click.Group):
    """Every error is one line on stderr and a non-zero exit, never a traceback."""

    def main(self, args=None, prog_name=None, **kwargs):
        import signal

        # Cleanup (temporary folders, files half-written) runs on SIGTERM as on
        # Ctrl-C; `serve` puts uvicorn's own handler in place when it starts.
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except HermesError as e:
            click.echo(f"error: {_rank_prefix()}{e}", err=True)
            sys.exit(1)
        except (KeyboardInterrupt, click.Abort):
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except _Terminated:
            click.echo("\nterminated", err=True)
            sys.exit(143)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-hermes")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="warning", show_default=True,
              help="what goes to the log on stderr (a failed request logs its traceback)")
def main(log_level: str) -> None:
    """Run Nous Hermes 2 Mixtral 8x7B with MLX."""
    import logging

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


def sampling_options(command: Callable, max_tokens: Optional[int] = 512,
                     max_tokens_help: str = "most tokens to generate") -> Callable:
    options = [
        click.option("--max-tokens", "-n", type=int, default=max_tokens,
                     show_default=max_tokens is not None, help=max_tokens_help),
        click.option("--temp", type=float, default=0.7, show_default=True,
                     help="sampling temperature; 0 is greedy"),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True, help="0: off"),
        click.option("--min-p", type=float, default=0.0, show_default=True, help="0: off"),
        click.option("--repetition-penalty", type=float, default=None, help="e.g. 1.1"),
        click.option("--repetition-context-size", type=int, default=20, show_default=True),
        click.option("--seed", type=int, default=None, help="for reproducible sampling"),
        click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None,
                     callback=lambda ctx, p, v: int(v) if v else None,
                     help="quantize the KV cache, for long contexts"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _sampling(options: dict) -> tuple:
    """The sampling options as SamplingParams (checked before the slow load),
    and the other options."""
    from .sampling import SamplingParams

    max_tokens = options.get("max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise HermesError(f"--max-tokens must be at least 1, got {max_tokens}")
    return SamplingParams.pick(options)


_PORTABLE_HELP = ("run MLX's own ops only, as a Mac does: none of this machine's fast paths "
                  "(CUDA kernels, dense prefill, CPU streams)")


def _load(model: str, tokens: int, kv_bits: Optional[int], portable: bool = False):
    from . import distributed
    from .cache import check_kv_bits
    from .loader import load, resolve_model_path
    from .memory import check_fits
    from .specialize import FastPaths

    check_kv_bits(kv_bits)  # before minutes of loading
    paths = FastPaths.none() if portable else FastPaths()
    path = resolve_model_path(model)
    if not _launched():
        check_fits(path, tokens, kv_bits)
        click.echo(f"loading {model} ...", err=True)
        return load(path, fast_paths=paths)
    with _bar("loading layers", _rank0()) as update:
        return distributed.load_launched(path, paths, progress=update)


def _launched() -> bool:
    """Started by mlx.launch (which sets MLX_RANK on every rank)."""
    return "MLX_RANK" in os.environ


def _rank_prefix() -> str:
    return f"rank {os.environ['MLX_RANK']}: " if _launched() else ""


def _rank0() -> bool:
    """Alone, or rank 0 under mlx.launch: the process that talks to the user."""
    return os.environ.get("MLX_RANK", "0") == "0"


def _info(message: str) -> None:
    """A status line on stderr, from rank 0 only when launched on several."""
    if _rank0():
        click.echo(message, err=True)


def _prefill_progress(done: int, total: int) -> None:
    if total > 2048 and _rank0():  # only prompts long enough to take a while
        click.echo(f"\rprefill {done}/{total} tokens", err=True, nl=done == total)


def _stats_line(stats: dict) -> str:
    return (
        f"prompt: {stats['prompt_tokens']} tokens, {stats['prompt_tps']:.1f} tok/s | "
        f"generation: {stats['generated_tokens']} tokens, {stats['decode_tps']:.1f} tok/s | "
        f"ttft {stats['ttft_s']:.2f} s | peak memory {stats['peak_memory_gb']:.2f} GB"
    )


@main.command()
@click.option("--model", "-m", required=True, help=_MODEL_HELP)
@click.option("--prompt", "-p", required=True,
              help="the prompt; - reads standard input (less one trailing newline, so that "
                   "`echo X | ... --prompt -` is `--prompt X`)")
@click.option("--system", "-s", default=None, help="system prompt")
@click.option("--raw", is_flag=True, help="send the prompt verbatim, without the chat template")
@click.option("--stop", multiple=True, help="stop at this string (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object at the end")
@click.option("--portable", is_flag=True, help=_PORTABLE_HELP)
@sampling_options
def generate(model: str, prompt: str, system: Optional[str], raw: bool, stop: tuple,
             as_json: bool, portable: bool, **options) -> None:
    """Complete one prompt (a ChatML user turn unless --raw)."""
    from .generate import stream_generate

    if prompt == "-":
        prompt = sys.stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
    if not prompt.strip():
        raise HermesError("the prompt is empty")
    if raw and system is not None:
        raise HermesError("--system needs the chat template: it cannot go with --raw "
                          "(write the system text into the raw prompt instead)")
    sampling, options = _sampling(options)
    # A character is at least one token's worth of text: a safe upper bound.
    model_obj, tokenizer = _load(model, len(prompt) + options["max_tokens"], options["kv_bits"],
                                 portable)
    if raw:
        ids = tokenizer.encode(prompt)
    else:
        ids = tokenizer.user_turn(prompt, system)

    text, tokens, last = [], [], None
    for chunk in stream_generate(model_obj, tokenizer, ids, sampling=sampling, stop=stop,
                                 progress=_prefill_progress, **options):
        tokens.append(chunk.token)
        text.append(chunk.text)
        if not as_json:
            click.echo(chunk.text, nl=False)
        last = chunk
    if as_json:
        result = {"text": "".join(text), "tokens": tokens,
                  "finish_reason": last.finish_reason, **last.stats}
        click.echo(json.dumps(result))
    else:
        click.echo()
        _info(_stats_line(last.stats))


@main.command()
@click.option("--model", "-m", required=True, help=_MODEL_HELP)
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL, one object per line: \"prompt\" (a user turn; verbatim with "
                   "\"raw\": true) or \"messages\", and optionally \"system\", \"id\", "
                   "\"max_tokens\", \"temperature\", \"top_p\", \"top_k\", \"min_p\", "
                   "\"repetition_penalty\", \"stop\", \"seed\"")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL results in input order; an existing one is continued")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="prompts decoded together [default: 16]")
@click.option("--on-error", type=click.Choice(["skip", "stop"]), default="skip",
              show_default=True, help="a bad line: write an error record, or stop before "
                                      "generating anything")
@click.option("--portable", is_flag=True, help=_PORTABLE_HELP)
@sampling_options
def batch(model: str, input_path: str, output_path: str, max_batch: Optional[int],
          on_error: str, portable: bool, **options) -> None:
    """Complete every prompt of a JSONL file, many at a time."""
    from pathlib import Path

    from . import batch_file
    from .batching import DEFAULT_MAX_BATCH

    if options.pop("kv_bits") is not None:
        raise HermesError("--kv-bits cannot be used with batch: mlx-lm's quantized KV cache "
                          "cannot join a batch")
    if _launched():
        raise HermesError("batch runs on one machine; under mlx.launch use generate or chat")
    source, target = Path(input_path), Path(output_path)
    if not source.is_file():
        raise HermesError(f"no input file {source}")
    if target.exists() and target.resolve() == source.resolve():
        raise HermesError("--output must not be the input file")
    _sampling(options)  # checked before the slow load
    model_obj, tokenizer = _load(model, options["max_tokens"] or 512, None, portable)
    bar = None

    def progress(done: int, total: int, tps: float) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(desc="lines", total=total, file=sys.stderr, unit="line",
                       bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}"
                                  "{postfix}]")
        bar.update(done - bar.n)
        bar.set_postfix_str(f"{tps:.1f} tok/s", refresh=True)

    try:
        result = batch_file.run(model_obj, tokenizer, source, target, defaults=options,
                                max_batch=max_batch or DEFAULT_MAX_BATCH, on_error=on_error,
                                progress=progress)
    except (KeyboardInterrupt, _Terminated):
        if bar is not None:
            bar.close()
        click.echo(f"\nstopped: {target} holds the finished lines; run the same command "
                   "again to continue", err=True)
        raise
    if bar is not None:
        bar.close()
    click.echo(f"{result['done']} lines written to {target} ({result['errors']} errors, "
               f"{result['skipped']} done before), {result['generated_tokens']} tokens in "
               f"{result['seconds']:.1f} s", err=True)


CHAT_HELP = """commands:
  /reset         forget the conversation (keeps the system prompt)
  /system TEXT   set the system prompt (no TEXT: remove it)
  /save FILE     save the conversation, KV cache included
  /load FILE     resume a saved conversation
  /stats         speed and memory of the last reply
  /help          this help
  /exit          leave (or Ctrl-D); Ctrl-C stops a reply"""


@main.command()
@click.option("--model", "-m", required=True, help=_MODEL_HELP)
@click.option("--system", "-s", default=None, help="system prompt")
@click.option("--portable", is_flag=True, help=_PORTABLE_HELP)
@sampling_options
def chat(model: str, system: Optional[str], portable: bool, **options) -> None:
    """Talk with the model in the terminal."""
    from .chat import ChatSession

    sampling, options = _sampling(options)
    model_obj, tokenizer = _load(model, 8192, options["kv_bits"], portable)
    session = ChatSession(model_obj, tokenizer, system=system, sampling=sampling, **options)
    _repl(session)


def _repl(session) -> None:
    from .chat import ChatSession

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    _info("mlx-hermes chat: /help for commands, Ctrl-D to exit")
    split = getattr(session.model, "group", None) is not None
    while True:
        try:
            line = _read_line(session.model)
        except KeyboardInterrupt:
            click.echo()
            continue
        if line is None:
            click.echo()
            return
        command, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            if not line.strip():
                continue
            if command in ("/exit", "/quit", "/bye"):
                return
            if command == "/help":
                click.echo(CHAT_HELP)
            elif command == "/reset":
                session.reset()
                click.echo("(conversation cleared)")
            elif command == "/system":
                session.set_system(arg or None)
                click.echo("(system prompt set)" if arg else "(system prompt removed)")
            elif command in ("/save", "/load") and split:
                raise HermesError(f"{command} is not available when the model is split "
                                  "across machines")
            elif command == "/save":
                _need(arg, "/save FILE")
                click.echo(f"(saved to {session.save(arg)})")
            elif command == "/load":
                _need(arg, "/load FILE")
                session = ChatSession.load(arg, session.model, session.tokenizer,
                                           **session.options)
                click.echo(f"(resumed {len(session.messages)} messages from {arg})")
            elif command == "/stats":
                click.echo(_stats_line(session.last_stats) if session.last_stats
                           else "(no reply yet)")
            elif command.startswith("/"):
                click.echo(f"unknown command {command}; /help lists them")
            else:
                _reply(session, line)
        except HermesError as e:
            _info(f"error: {e}")  # every rank hits the same error: one says it


def _read_line(model) -> Optional[str]:
    """The next line of input; None at its end. With the model split across
    ranks, rank 0 reads it and every rank gets the same line."""
    from . import distributed

    group = getattr(model, "group", None)
    if group is None:
        try:
            return input(">>> ")
        except EOFError:
            return None
    watchdog = distributed.start_watchdog(group)
    watchdog.paused = True  # a person may take their time
    try:
        line = None
        if group.rank() == 0:
            try:
                line = input(">>> ")
            except EOFError:
                pass
        return distributed.broadcast_text(line, group)
    finally:
        watchdog.paused = False
        watchdog.beat()


def _yes(question: str) -> bool:
    """A yes/no answer (Enter is yes); asks again until it gets one."""
    while True:
        try:
            answer = input(question).strip().lower()
        except EOFError:
            return False
        if answer in ("", "y", "yes"):
            return True
        if answer in ("n", "no"):
            return False
        click.echo("error: answer y or n", err=True)


def _keep_for_next_input(text: str) -> None:
    """Put text in the next prompt's line, ready to edit (with readline), and in
    the history in any case."""
    try:
        import readline
    except ImportError:
        return
    readline.add_history(text)

    def prefill() -> None:
        readline.insert_text(text)
        readline.set_startup_hook(None)  # once
    readline.set_startup_hook(prefill)


def _need(arg: str, usage: str) -> None:
    if not arg:
        raise HermesError(f"usage: {usage}")


def _reply(session, text: str) -> None:
    from .chat import ContextFull

    while True:
        stream = session.send(text)
        try:
            for chunk in stream:
                click.echo(chunk.text, nl=False)
            click.echo()
            return
        except KeyboardInterrupt:
            if getattr(session.model, "group", None) is not None:
                raise  # the other ranks cannot know: stop them all (mlx.launch does)
            click.echo("\n(stopped)")
            return
        except ContextFull as e:
            if getattr(session.model, "group", None) is not None:
                _info(f"({e}: dropping the oldest turn)")  # every rank decides alike
            elif not _yes(f"{e}. Drop the oldest turns? [Y/n] "):
                click.echo("(not sent; your message is kept as the next input)")
                _keep_for_next_input(text)
                return
            if not session.drop_oldest_turn():
                raise HermesError("this message alone is too long for the context") from None
        finally:
            stream.close()


@main.command()
@click.option("--model", "-m", default=None, help=_MODEL_HELP)
@click.option("--synthetic", type=click.Choice(["8x7b", "tiny"]), default=None,
              help="random weights of the real shapes, built here (no download)")
@click.option("--layers", type=int, default=None,
              help="with --synthetic: build only N layers and extrapolate to the full model")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help="with --synthetic: stored as this recipe (as `convert --recipe`) [default: "
                   "uniform]")
@click.option("--bits", type=click.Choice(_choices(OFFERED_BITS)), default=None,
              help="with --synthetic, uniform or mixed [default: 4]")
@click.option("--group-size", type=click.Choice(_choices(GROUP_SIZES)), default=None,
              help="with --synthetic, uniform or mixed [default: 64]")
@click.option("--prompt-tokens", type=int, default=512, show_default=True)
@click.option("--gen-tokens", type=int, default=128, show_default=True)
@click.option("--trials", type=int, default=3, show_default=True)
@click.option("--compare-mlx-lm", is_flag=True, help="also time mlx-lm's Mixtral on the same weights")
@click.option("--batch", "batch_sizes", default=None, metavar="SIZES",
              help="batched decode at these stream counts, e.g. 1,4,8,16,32 (with "
                   "--compare-mlx-lm: against mlx-lm's BatchGenerator)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--portable", is_flag=True, help=_PORTABLE_HELP)
@click.option("--watts", type=click.FloatRange(min=0, min_open=True), default=None,
              help="this machine's draw while generating, as you measured it: with --kwh-price, "
                   "the electricity cost per million tokens")
@click.option("--kwh-price", type=click.FloatRange(min=0), default=None,
              help="what a kWh costs you (any currency)")
@click.option("--cloud-price", type=click.FloatRange(min=0), default=None,
              help="a cloud API's price per million tokens, shown beside it")
def profile(model: Optional[str], synthetic: Optional[str], layers: Optional[int],
            recipe: Optional[str], bits: Optional[str], group_size: Optional[str],
            prompt_tokens: int, gen_tokens: int, trials: int,
            compare_mlx_lm: bool, batch_sizes: Optional[str], as_json: bool, portable: bool,
            watts: Optional[float], kwh_price: Optional[float],
            cloud_price: Optional[float]) -> None:
    """Tokens/s and memory bandwidth, against this machine's limit."""
    from . import profile as prof
    from .specialize import FastPaths

    sizes = _sizes(batch_sizes) if batch_sizes is not None else None
    if sizes and (layers is not None or watts is not None or _launched()):
        raise HermesError("--batch measures the whole model on one machine: no --layers, "
                          "--watts or mlx.launch")
    if (model is None) == (synthetic is None):
        raise HermesError("give either --model or --synthetic")
    if (watts is None) != (kwh_price is None) or (cloud_price is not None and watts is None):
        raise HermesError("the cost needs both --watts and --kwh-price (and --cloud-price only "
                          "with them)")
    if layers is not None and synthetic is None:
        raise HermesError("--layers applies to --synthetic only")
    if prompt_tokens < 1 or gen_tokens < 2 or trials < 1:
        raise HermesError("--prompt-tokens must be >= 1, --gen-tokens >= 2 and --trials >= 1")
    if _launched() and (synthetic or compare_mlx_lm):
        raise HermesError("under mlx.launch, profile takes --model (no --synthetic, no "
                          "--compare-mlx-lm)")
    machine = prof.Machine.here()
    if synthetic:
        from .formats import recipe as make_recipe

        stored_as = make_recipe(recipe or "uniform", int(bits) if bits else None,
                                int(group_size) if group_size else None)
        prof.check_synthetic_fits(synthetic, stored_as, layers, machine)
        with _bar("building", True) as update:
            model_obj = prof.synthetic_model(
                synthetic, layers, dtype=prof.compute_dtype(), progress=update,
                fast_paths=FastPaths.none() if portable else FastPaths(), stored_as=stored_as)
    elif recipe or bits or group_size:
        raise HermesError("--recipe, --bits and --group-size apply to --synthetic only")
    else:
        model_obj, tokenizer = _load(model, prompt_tokens + gen_tokens, None, portable)
    if sizes:
        _profile_batches(model_obj, None if synthetic else tokenizer, sizes, prompt_tokens,
                         gen_tokens, trials, compare_mlx_lm, as_json)
        return
    result = prof.run(model_obj, machine, prompt_tokens, gen_tokens, trials,
                      compare_mlx_lm=compare_mlx_lm, synthetic=synthetic,
                      progress=lambda text: _info(f"profile: {text}"))
    if watts is not None:
        result["cost"] = prof.local_cost(result["decode_tps"], watts, kwh_price, cloud_price)
    click.echo(json.dumps(result) if as_json else prof.format_report(result, machine))


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise HermesError(f"--batch takes stream counts like 1,4,8,16,32, not {text!r}")
    return sizes


def _profile_batches(model_obj, tokenizer, sizes: list[int], prompt_tokens: int,
                     gen_tokens: int, rounds: int, compare_mlx_lm: bool, as_json: bool) -> None:
    from . import batch_profile
    from . import profile as prof
    from .tokenizer import Tokenizer
    from .tiny import TOKENIZER

    tokenizer = tokenizer or Tokenizer.from_path(TOKENIZER)  # a synthetic model has the real vocab
    twin = prof.mlx_lm_twin(model_obj, prof._dtype(model_obj)) if compare_mlx_lm else None
    result = batch_profile.measure(model_obj, tokenizer, sizes, prompt_tokens=prompt_tokens,
                                   gen_tokens=gen_tokens, rounds=rounds, twin=twin,
                                   progress=lambda text: _info(f"profile: {text}"))
    click.echo(json.dumps(result) if as_json else batch_profile.format_table(result))


class _bar:
    """A tqdm progress bar on stderr as a progress(done, total) callback. It
    appears with the first report of work, so a command that fails at once
    prints no empty bar."""

    def __init__(self, desc: str, show: bool, unit: str = "it"):
        self.desc, self.show, self.unit = desc, show, unit
        self.bar = None

    def __enter__(self):
        def update(done: int, total: int) -> None:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(desc=self.desc, file=sys.stderr, disable=not self.show,
                                unit=self.unit, unit_scale=self.unit == "B")
            self.bar.total = total
            self.bar.update(done - self.bar.n)
        return update

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


@main.command()
@click.option("--hf-path", required=True, help="original checkpoint: folder or Hugging Face repo id")
@click.option("--mlx-path", required=True, help="output folder (must not exist, unless --force)")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help="uniform (the default): every weight at --bits; mixed: router 8-bit, v_proj, "
                   "embeddings and LM head 6-bit; fit-32gb / fit-24gb: experts at 3 / 2 bits "
                   "for 32 / 24 GB Macs (sets its own bits)")
@click.option("--bits", type=click.Choice(_choices(OFFERED_BITS)), default=None,
              help="with uniform or mixed [default: 4]")
@click.option("--group-size", type=click.Choice(_choices(GROUP_SIZES)), default=None,
              help="with uniform or mixed [default: 64]")
@click.option("--fit", "fit_gb", type=click.IntRange(min=1), default=None,
              help="GB of the Mac to run on: picks the largest recipe that fits its default "
                   "GPU working set with a 4k context")
@click.option("--dtype", type=click.Choice(list(DTYPES)),
              default="bfloat16", show_default=True, help="of scales and unquantized tensors")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="text file (or JSONL with a \"text\" field) to calibrate GPTQ on: learned "
                   "rounding for every quantized layer but the embeddings, worth most at 2-3 "
                   "bits; slower [default: round to nearest]")
@click.option("--calibration-tokens", type=click.IntRange(min=2), default=None,
              help="with --calibration: how many of its tokens to use [default: 32768]")
@click.option("--report", is_flag=True, help="measure the quantization error and KL divergence")
@click.option("--force", is_flag=True, help="replace an existing output folder")
def convert(hf_path: str, mlx_path: str, recipe: Optional[str], bits: Optional[str],
            group_size: Optional[str], fit_gb: Optional[int], dtype: str,
            calibration: Optional[Path], calibration_tokens: Optional[int], report: bool,
            force: bool) -> None:
    """Quantize the original checkpoint to MLX, in bounded memory."""
    from .convert_package import converter_package

    if fit_gb is not None:
        from .memory import recipe_for_mac

        if recipe or bits or group_size:
            raise HermesError("--fit picks the recipe: leave out --recipe, --bits and "
                              "--group-size")
        row, why = recipe_for_mac(fit_gb)
        recipe, bits = row["recipe"], None if row["recipe"].startswith("fit-") else row["bits"]
        click.echo(f"--fit {fit_gb}: {row['label']}: {why}", err=True)
    if calibration_tokens is not None and calibration is None:
        raise HermesError("--calibration-tokens needs --calibration FILE")
    converter = converter_package()
    extra = {} if calibration_tokens is None else {"calibration_tokens": calibration_tokens}
    with _bar("converting" + (" (GPTQ)" if calibration else ""), True, unit="B") as progress:
        summary = converter.convert(hf_path, mlx_path, bits=int(bits) if bits else None,
                                    group_size=int(group_size) if group_size else None,
                                    recipe=recipe or "uniform", dtype=dtype, force=force,
                                    progress=progress, calibration=calibration, **extra)
    click.echo(f"wrote {mlx_path}: {converter.format_size(summary['size_bytes'])}, "
               f"{summary['bits_per_weight']:.3f} bits per weight ({summary['label']}"
               f"{', rounded by ' + summary['rounding'] if calibration else ''}); "
               f"chat with it: mlx-hermes chat --model {mlx_path}")
    if report:
        from mlx_hermes.loader import resolve_model_path

        result = converter.quality_report(resolve_model_path(hf_path), mlx_path)
        click.echo(converter.format_report(result))


@main.command()
@click.option("--model", "-m", required=True, help=_MODEL_HELP)
@click.option("--model-name", default=None,
              help="the name clients ask for [default: the folder's name or the repo id]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; 0.0.0.0 opens it to the network")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", envvar="MLX_HERMES_API_KEY", default=None,
              help="require `Authorization: Bearer KEY` (or set MLX_HERMES_API_KEY)")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="requests decoded together; more wait in the queue [default: 16, or 1 with "
                   "--kv-bits]")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="also let web pages from ORIGIN call the server (CORS; repeatable). "
                   "Localhost, app://, file://, tauri:// and vscode-webview:// are allowed "
                   "already, as Ollama does")
@click.option("--max-queue", type=click.IntRange(min=1), default=32, show_default=True,
              help="requests that may wait for a place in the batch; more are refused with 503")
@click.option("--max-context", type=click.IntRange(min=16), default=None,
              help="most tokens per request, prompt and reply [default: the model's]")
@click.option("--prompt-cache-gb", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="memory for the KV caches of earlier requests (least recently used go first)")
@click.option("--portable", is_flag=True, help=_PORTABLE_HELP)
@functools.partial(sampling_options, max_tokens=None,
                   max_tokens_help="default most tokens per reply [default: to the context's end]")
def serve(model: str, model_name: Optional[str], host: str, port: int, api_key: Optional[str],
          max_batch: Optional[int], allow_origins: tuple, max_queue: int,
          max_context: Optional[int], prompt_cache_gb: float, portable: bool,
          **options) -> None:
    """Serve the model over OpenAI- and Ollama-compatible HTTP APIs."""
    from pathlib import Path

    from .loader import resolve_model_path, weight_files
    from .server import create_app, run

    if _launched():
        raise HermesError("serve runs on one machine; under mlx.launch use generate, chat or "
                          "profile")
    from .batching import DEFAULT_MAX_BATCH

    _sampling(options)  # checked now; the server applies them per request
    kv_bits = options.pop("kv_bits")
    if kv_bits is not None and (max_batch or 1) > 1:
        raise HermesError("--kv-bits runs one request at a time (mlx-lm's quantized KV cache "
                          "cannot join a batch): drop --max-batch, or --kv-bits")
    max_batch = max_batch or (1 if kv_bits is not None else DEFAULT_MAX_BATCH)
    _check_port(host, port)  # before a load that can take minutes
    path = resolve_model_path(model)
    model_obj, tokenizer = _load(str(path), max_context or 32768, kv_bits, portable)
    name = model_name or (model if not Path(model).expanduser().exists()
                          else Path(model).expanduser().resolve().name)
    app = create_app(model_obj, tokenizer, name=name, api_key=api_key, max_batch=max_batch,
                     allow_origins=allow_origins,
                     max_queue=max_queue,
                     max_context=max_context, cache_bytes=int(prompt_cache_gb * 2**30),
                     kv_bits=kv_bits, defaults=options,
                     weights_bytes=sum(f.stat().st_size for f in weight_files(path)))
    engine = app.state.engine
    click.echo(f"serving {name} on http://{host}:{port} (OpenAI: /v1, Ollama: /api)"
               + ("" if api_key is None else ", API key required"), err=True)
    click.echo(f"up to {max_batch} requests decoded together, {max_queue} more may wait; "
               f"{engine.kv_budget / 1e9:.1f} GB for their KV cache (a request reserves its "
               "prompt plus max_tokens)", err=True)
    run(app, host=host, port=port)


@main.command()
@click.option("--model", "-m", required=True, help=_MODEL_HELP)
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="plain text, or JSONL with a \"text\" field per line")
@click.option("--context", type=click.IntRange(min=2), default=512, show_default=True,
              help="tokens per window (windows do not overlap)")
@click.option("--compare", "reference", default=None,
              help="a reference model (e.g. the original checkpoint): adds KL divergence and "
                   "top-1 agreement")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--portable", is_flag=True, help=_PORTABLE_HELP)
def perplexity(model: str, data: str, context: int, reference: Optional[str], as_json: bool,
               portable: bool) -> None:
    """Perplexity of a model on a text (and its distance from a reference)."""
    from pathlib import Path

    from . import perplexity as ppl

    from .loader import resolve_model_path

    texts = ppl.read_texts(Path(data))
    model_obj, tokenizer = _load(model, context, None, portable)
    # the reference is streamed a layer at a time: the original checkpoint needs no 96 GB
    reference_path = resolve_model_path(reference) if reference else None
    with _bar("reference layers, then windows", _rank0()) as update:
        result = ppl.perplexity(model_obj, tokenizer, texts, context, reference_path, update)
    click.echo(json.dumps(result) if as_json else ppl.format_result(result))


@main.command()
@click.option("--model", "-m", default=None,
              help=f"also check this model ({_MODEL_HELP}): its first layers, and its fit")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON, to attach to "
              "an issue (versions and figures, no paths)")
def doctor(model: Optional[str], as_json: bool) -> None:
    """Check this machine: every compute path against the CPU, speed, fit."""
    from . import doctor as checks

    report = checks.run(model, progress=lambda text: _info(f"doctor: {text}"))
    click.echo(json.dumps(report) if as_json else checks.format_report(report))
    if not report["ok"]:
        sys.exit(1)


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise HermesError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


if __name__ == "__main__":
    main()
