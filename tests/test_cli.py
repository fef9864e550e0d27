"""The `mlx-hermes` command: in-process through CliRunner, plus one real
process per command (and a real terminal for the chat REPL)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import mlx_hermes
from mlx_hermes import HermesError, chip
from mlx_hermes.cli import main

from .conftest import ROOT, copy_model


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def test_version_and_help():
    result = run("--version")
    assert result.exit_code == 0 and mlx_hermes.__version__ in result.output
    result = run("--help")
    assert result.exit_code == 0 and "generate" in result.output and "chat" in result.output


def test_runs_from_a_source_checkout_without_install(tmp_path):
    # As on the GPU machine: PYTHONPATH=<checkout>, `python -m mlx_hermes`.
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "mlx_hermes", "--version"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert mlx_hermes.__version__ in done.stdout


def test_generate_json_equals_the_python_api(tiny_model):
    result = run("generate", "-m", str(tiny_model), "-p", "Hello", "--temp", "0", "-n", "12",
                 "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    model, tokenizer = mlx_hermes.load(tiny_model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert out["text"] == mlx_hermes.generate(model, tokenizer, ids, max_tokens=12)
    assert out["prompt_tokens"] == len(ids) and out["generated_tokens"] == len(out["tokens"])
    assert out["finish_reason"] in ("stop", "length")


def test_generate_raw_system_stdin_and_stop(tiny_model):
    raw = json.loads(run("generate", "-m", str(tiny_model), "-p", "Hello", "--raw", "--temp",
                         "0", "-n", "3", "--json").stdout)
    assert raw["prompt_tokens"] == 2  # <s> Hello
    system = json.loads(run("generate", "-m", str(tiny_model), "-p", "Hello", "-s", "Be kind.",
                            "-n", "3", "--json").stdout)
    assert system["prompt_tokens"] > 15
    # `echo Hello | ... --prompt -`: the trailing newline is not part of the prompt
    piped = json.loads(run("generate", "-m", str(tiny_model), "-p", "-", "--raw", "--temp", "0",
                           "-n", "3", "--json", input="Hello\n").stdout)
    assert piped["tokens"] == raw["tokens"] and piped["prompt_tokens"] == 2

    full = json.loads(run("generate", "-m", str(tiny_model), "-p", "Hi", "--temp", "0", "-n",
                          "20", "--json").stdout)["text"]
    stop = full[5:8]
    cut = json.loads(run("generate", "-m", str(tiny_model), "-p", "Hi", "--temp", "0", "-n",
                         "20", "--stop", stop, "--json").stdout)
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_generate_streams_text_and_prints_stats_to_stderr(tiny_model):
    result = run("generate", "-m", str(tiny_model), "-p", "Hello", "-n", "5", "--seed", "1")
    assert result.exit_code == 0
    assert "tok/s" in result.stderr and "tok/s" not in result.stdout


@pytest.mark.parametrize("args,message", [
    (["-m", "/no/such/model", "-p", "hi"], "/no/such/model does not exist"),
    (["-p", "   "], "the prompt is empty"),
    (["-p", "hi", "-n", "0"], "--max-tokens must be at least 1"),
    (["-p", "hi", "--temp", "-1"], "temp must be >= 0"),
    (["-p", "hi", "--top-p", "2"], "top_p"),
    (["-p", "hi", "--kv-bits", "3"], "'3' is not one of"),
    (["-p", "hi", "--max-tokens", "many"], "'many' is not a valid integer"),
    (["-p", "hi", "-n", "40000"], "exceeds the model's context of 32768 tokens"),
    (["-p", "hi", "--raw", "-s", "Be kind."], "--system needs the chat template"),
])
def test_generate_bad_input_is_one_line(tiny_model, args, message):
    if "-m" not in args:
        args = ["-m", str(tiny_model)] + args
    result = run("generate", *args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_chat_in_process(tiny_model, tmp_path):
    saved = tmp_path / "talk.safetensors"
    script = "\n".join(["Hello", "/stats", f"/save {saved}", "/reset", "/system Be brief.",
                        f"/load {saved}", "/nonsense", "/help", "Again", "/exit"]) + "\n"
    result = run("chat", "-m", str(tiny_model), "-n", "5", "--temp", "0", input=script)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "tok/s" in out and f"(saved to {saved})" in out and "(conversation cleared)" in out
    assert "(resumed 2 messages" in out and "unknown command /nonsense" in out
    assert "/reset" in out  # the help text
    assert saved.exists()


def test_portable_gives_the_same_tokens(tiny_model):
    args = ["generate", "-m", str(tiny_model), "-p", "Hello", "--temp", "0", "-n", "8", "--json"]
    fast, portable = (json.loads(run(*args, *extra).stdout) for extra in ([], ["--portable"]))
    assert fast["tokens"] == portable["tokens"]


def test_every_documented_option_runs_on_the_tiny_model(tiny_model):
    on_cuda = chip.on_cuda()
    for bits in ("4", "8"):
        result = run("generate", "-m", str(tiny_model), "-p", "Hello", "-n", "4",
                     "--kv-bits", bits)
        if on_cuda:  # refused there: MLX's CUDA build gets its attention wrong
            assert result.exit_code == 1 and "--kv-bits does not run on CUDA" in result.stderr
        else:
            assert result.exit_code == 0, result.output


def test_kv_bits_are_refused_on_cuda_before_loading():
    from mlx_hermes.cache import check_kv_bits

    with pytest.raises(HermesError, match="does not run on CUDA"):
        check_kv_bits(4, on_cuda=True)
    check_kv_bits(8, on_cuda=False)
    check_kv_bits(None, on_cuda=True)
    with pytest.raises(HermesError, match="must be 4 or 8"):
        check_kv_bits(3, on_cuda=False)


def test_chat_save_and_load_names_and_errors(tiny_model, tmp_path):
    script = "\n".join(["Hello", "/save /no/such/dir/x.safetensors", f"/save {tmp_path}/conv2",
                        "/reset", f"/load {tmp_path}/conv2", "/exit"]) + "\n"
    result = run("chat", "-m", str(tiny_model), "-n", "3", "--temp", "0", input=script)
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot save the conversation to /no/such/dir" in errors[0]
    assert "Traceback" not in result.output
    assert f"(saved to {tmp_path}/conv2.safetensors)" in result.stdout
    assert "(resumed 2 messages" in result.stdout  # the chat went on after the error
    assert [p.name for p in tmp_path.iterdir()] == ["conv2.safetensors"]


def test_chat_bad_input(tiny_model):
    result = run("chat", "-m", str(tiny_model), "-n", "5", input="/load /no/such/file\n/exit\n")
    assert result.exit_code == 0 and "error: cannot read the conversation" in result.stderr
    result = run("chat", "-m", str(tiny_model), "-n", "0")
    assert result.exit_code != 0 and "error: --max-tokens" in result.stderr


def mlx_hermes_command() -> list[str]:
    exe = shutil.which("mlx-hermes", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "mlx_hermes"]


def test_generate_process_smoke(tiny_model):
    done = subprocess.run(mlx_hermes_command() + ["generate", "-m", str(tiny_model), "-p", "Hi",
                                                  "-n", "4"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "generation: 4 tokens" in done.stderr or "generation:" in done.stderr


def test_chat_repl_in_a_real_terminal(tiny_model):
    import pexpect

    cmd = mlx_hermes_command()
    # 400 tokens: a second or so on the tiny model, long enough to interrupt.
    child = pexpect.spawn(cmd[0], cmd[1:] + ["chat", "-m", str(tiny_model), "--temp", "0",
                                              "-n", "400"],
                          encoding="utf-8", timeout=60, dimensions=(40, 200))
    try:
        child.expect(">>> ")
        child.sendline("Hello")
        child.expect(">>> ")  # the first reply ran to its end
        child.sendline("/stats")
        child.expect(r"generation: 400 tokens")
        child.expect(">>> ")
        child.sendline("Tell me everything")
        child.expect("Tell me everything\r\n")  # the terminal's echo
        child.expect(r"\S{3,}")  # then some of the reply
        child.sendintr()  # Ctrl-C stops the reply and keeps the session
        child.expect(r"\(stopped\)")
        child.expect(">>> ")
        child.sendline("/reset")
        child.expect(r"\(conversation cleared\)")
        child.expect(">>> ")
        child.sendeof()  # Ctrl-D leaves
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_offers_to_drop_old_turns_when_the_context_is_full(tiny_model, tmp_path):
    small = copy_model(tiny_model, tmp_path / "small", max_position_embeddings=64)
    long = "This is a rather long message " * 2
    result = run("chat", "-m", str(small), "-n", "20", "--temp", "0",
                 input=f"Hello\n{long}\ny\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "exceeds the context of 64 tokens. Drop the oldest turns?" in result.stdout
    assert result.stdout.count(">>> ") == 3  # Hello, the long message, /exit

    # "n" keeps the conversation and says what became of the message; an
    # answer that is neither asks again.
    result = run("chat", "-m", str(small), "-n", "20", "--temp", "0",
                 input=f"Hello\n{long}\nmaybe\nn\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Drop the oldest turns?") == 2
    assert "error: answer y or n" in result.stderr and "Error:" not in result.output
    assert "(not sent; your message is kept as the next input)" in result.stdout
