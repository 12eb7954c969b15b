"""``mc2gguf chat`` and ``mc2gguf serve`` on the tiny seeded Mixtral (random weights: answers are gibberish,
so the tests compare answers with independently computed ones and never judge their content)."""

from __future__ import annotations

import concurrent.futures
import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import pytest

from mc2gguf.cli import main
from mc2gguf.convert import convert
from mc2gguf.errors import Mc2ggufError
from mc2gguf.quant.types import quant_type

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
# A template unlike any the bindings know, so that an answer can only match if this very template was applied.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<<assistant>>{% endif %}")
EOS = 2
HANG = 120  # seconds: only to turn a hang into a failure


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "mc2gguf.cli", *map(str, args)]


@pytest.fixture(scope="module")
def chat_gguf(tiny_mixtral, tmp_path_factory, llama_build) -> Path:
    """The tiny Mixtral with TEMPLATE as its chat template and a zero output row for EOS: with random
    logits around 0 greedy decoding never picks EOS, so every answer runs to --max-tokens."""
    from safetensors.torch import load_file, save_file

    src = tmp_path_factory.mktemp("chat-src") / "model"
    shutil.copytree(tiny_mixtral, src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    tensors = load_file(shard)
    tensors["lm_head.weight"][EOS] = 0
    save_file(tensors, shard, metadata={"format": "pt"})
    return convert(src, tmp_path_factory.mktemp("chat") / "chat.gguf", quant_type("Q8_0")).out


@pytest.fixture(scope="module")
def plain_gguf(tiny_mixtral, tmp_path_factory, llama_build) -> Path:
    """The tiny Mixtral as converted: no chat template."""
    return convert(tiny_mixtral, tmp_path_factory.mktemp("plain") / "plain.gguf", quant_type("Q8_0")).out


@pytest.fixture(scope="module")
def reference_llm(chat_gguf):
    from mc2gguf.llama.runtime import bindings

    llm = bindings().Llama(model_path=str(chat_gguf), n_ctx=512, n_threads=1, verbose=False)
    yield llm
    llm.close()


def greedy(llm, prompt: str, n: int = 8) -> str:
    """``n`` greedy tokens after ``prompt`` (special tokens parsed, no extra BOS), decoded as UTF-8, straight
    from the bindings' token generator: no template, no chat machinery."""
    tokens = []
    for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=False, special=True), temp=0):
        tokens.append(token)
        if len(tokens) == n:
            break
    return llm.detokenize(tokens).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def expected(reference_llm) -> list[str]:
    """The answers to "hi" then "how are you", rendered by hand with TEMPLATE and its history."""
    a1 = greedy(reference_llm, "<s><<user>>hi\n<<assistant>>")
    a2 = greedy(reference_llm, f"<s><<user>>hi\n<<assistant>>{a1}\n<<user>>how are you\n<<assistant>>")
    assert a1 and a2
    return [a1, a2]


@pytest.fixture
def asked(monkeypatch):
    """Every ``ChatSession.ask`` call in this process: (answer, the pieces it was streamed in)."""
    from mc2gguf.llama.interactive import ChatSession

    calls, ask = [], ChatSession.ask

    def recording_ask(self, text, write, *args, **kwargs):
        pieces = []

        def record(piece):
            pieces.append(piece)
            write(piece)

        calls.append((ask(self, text, record, *args, **kwargs), pieces))
        return calls[-1][0]

    monkeypatch.setattr(ChatSession, "ask", recording_ask)
    return calls


# ---------------------------------------------------------------------------------------------- chat

def test_chat_piped_lines_use_file_template_and_history(chat_gguf, expected):
    proc = subprocess.run(cli("chat", chat_gguf, "--max-tokens", 8, "--temp", 0, "--threads", 1, "--ctx", 512),
                          input="hi\nhow are you\n/exit\nnot read\n", capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=HANG)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{expected[0]}\n{expected[1]}\n"
    assert "chat template: the file's tokenizer.chat_template" in proc.stderr


def test_chat_streams_answers(chat_gguf, expected, asked):
    from mc2gguf.llama.interactive import run_chat

    out, err = io.StringIO(), io.StringIO()
    rc = run_chat(chat_gguf, n_ctx=512, max_tokens=8, temperature=0, n_threads=1,
                  stdin=io.StringIO("hi\nhow are you\n"), stdout=out, stderr=err)
    assert rc == 0
    assert [answer for answer, _ in asked] == expected
    assert out.getvalue() == f"{expected[0]}\n{expected[1]}\n"
    for answer, pieces in asked:  # streamed: each answer arrived in several writes, as its tokens came
        assert len(pieces) >= 2 and "".join(pieces) == answer


def test_chat_session_feeds_the_template_to_llama(chat_gguf, reference_llm):
    """The tokens llama.cpp evaluated start with the hand-rendered template, system message included."""
    from mc2gguf.llama.interactive import ChatSession

    session = ChatSession(reference_llm, system="be brief", max_tokens=4, temperature=0)
    assert session.template_from_file and session.system_in_template
    session.ask("hi", lambda piece: None)
    prompt = "<s><<system>>be brief\n<<user>>hi\n<<assistant>>"
    tokens = reference_llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert list(reference_llm.input_ids[:len(tokens)]) == tokens


def test_chat_without_template_falls_back_to_mixtral_instruct(plain_gguf):
    from mc2gguf.llama.interactive import ChatSession, load_model

    llm = load_model(plain_gguf, 512, 1)
    try:
        session = ChatSession(llm, system="be brief", max_tokens=4, temperature=0)
        assert not session.template_from_file and not session.system_in_template
        assert "no tokenizer.chat_template" in session.describe()
        session.ask("hi", lambda piece: None)
        prompt = "<s>[INST] be brief\n\nhi [/INST]"
        assert session.messages()[0]["content"] == "be brief\n\nhi"
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert list(llm.input_ids[:len(tokens)]) == tokens
    finally:
        llm.close()
    proc = subprocess.run(cli("chat", plain_gguf, "--max-tokens", 4, "--ctx", 512, "--threads", 1), input="hi\n",
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=HANG)
    assert proc.returncode == 0, proc.stderr
    assert "no tokenizer.chat_template in the file: falling back to Mixtral-Instruct" in proc.stderr


def test_chat_sigint_stops_only_the_answer(chat_gguf, expected, asked):
    """A real SIGINT during the first answer (sent by the first streamed piece) ends that answer only."""
    from mc2gguf.llama.interactive import run_chat

    class Interrupting(io.StringIO):
        def write(self, text):
            if not self.tell():
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(text)

    err = io.StringIO()
    rc = run_chat(chat_gguf, n_ctx=512, max_tokens=8, temperature=0, n_threads=1,
                  stdin=io.StringIO("hi\nhow are you\n"), stdout=Interrupting(), stderr=err)
    assert rc == 0
    (first, _), (second, _) = asked
    assert len(first) < len(expected[0]) and expected[0].startswith(first)
    assert second
    assert err.getvalue().count("(answer stopped)") == 1


class Terminal:
    """``mc2gguf chat`` on a pseudo-terminal that is its controlling terminal (so ^C is a real SIGINT)."""

    def __init__(self, *args):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(cli("chat", *args), stdin=slave, stdout=slave, stderr=slave, env=ENV, cwd=REPO,
                                     start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.master, self.buffer, self.pos = master, b"", 0

    def read_until(self, predicate) -> None:
        deadline = time.monotonic() + HANG
        while not predicate(self.buffer):
            if time.monotonic() > deadline:
                raise AssertionError(f"terminal output so far: {self.buffer!r}")
            if select.select([self.master], [], [], 1)[0]:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"chat exited early ({self.proc.wait(HANG)}): {self.buffer!r}")
                self.buffer += data

    def expect(self, text: bytes) -> None:
        """Wait for ``text`` after the previous match, and move past it."""
        self.read_until(lambda b: text in b[self.pos:])
        self.pos = self.buffer.index(text, self.pos) + len(text)

    def expect_more(self) -> None:
        """Wait for any output after the previous match."""
        self.read_until(lambda b: len(b) > self.pos)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def exit_status(self) -> int:
        return self.proc.wait(HANG)

    def quit_at_prompt(self) -> int:
        """^C at the prompt; its exit status. CPython's readline only notices a signal that interrupts its
        select(): one landing between the prompt's output and that call (a window a loaded machine widens) waits
        for the next key or signal, so ^C is repeated every two seconds, as a user would press it again."""
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline:
            self.send(b"\x03")
            try:
                return self.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        return self.exit_status()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def _closed_after_test(start):
    """A fixture body: hands the test ``start`` and closes everything it started."""
    started = []
    yield lambda *args: started.append(start(*args)) or started[-1]
    for item in started:
        item.close()


@pytest.fixture
def terminal():
    yield from _closed_after_test(Terminal)


def test_chat_terminal_ctrl_c_stops_answer_then_ctrl_d_exits(chat_gguf, terminal):
    term = terminal(chat_gguf, "--max-tokens", 0, "--ctx", 4096, "--temp", 0, "--threads", 1)
    term.expect(b"\n> ")  # the prompt, at the start of a line
    term.send(b"hi\r")
    term.expect(b"hi\r\n")
    term.expect_more()  # the answer is streaming (up to ~4000 tokens: this model never says EOS)
    term.send(b"\x03")
    term.expect(b"(answer stopped)")
    term.expect(b"\n> ")
    term.send(b"\x04")
    assert term.exit_status() == 0


def test_chat_terminal_ctrl_c_at_prompt_exits_0(chat_gguf, terminal):
    term = terminal(chat_gguf, "--ctx", 512, "--threads", 1)
    term.expect(b"\n> ")
    assert term.quit_at_prompt() == 0


def test_chat_terminal_ctrl_c_quits_when_started_with_sigint_ignored(chat_gguf, terminal):
    """A chat started from a shell script's `cmd &` inherits SIGINT ignored; on a terminal, ^C still quits."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the child
    try:
        term = terminal(chat_gguf, "--ctx", 512, "--threads", 1)
    finally:
        signal.signal(signal.SIGINT, previous)
    term.expect(b"\n> ")
    assert term.quit_at_prompt() == 0


# --------------------------------------------------------------------------------------------- serve

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=HANG) as r:
        data = json.loads(r.read())
    text = data["content"] if "content" in data else data["choices"][0]["message"]["content"]
    return r.status, text


class Server:
    """``mc2gguf serve`` on a free loopback port, waited for until healthy; killed at the end if still up."""

    def __init__(self, model: Path, *args):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(cli("serve", model, "--port", self.port, "--threads", 1, *args),
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV, cwd=REPO)
        self.out = b""
        try:
            deadline = time.monotonic() + HANG
            while b"mc2gguf: serving" not in self.out:  # printed once the server answers /health
                assert time.monotonic() < deadline, f"llama-server did not become healthy: {self.out!r}"
                if select.select([self.proc.stdout], [], [], 1)[0]:
                    data = os.read(self.proc.stdout.fileno(), 4096)
                    assert data, f"mc2gguf serve exited early ({self.proc.wait(HANG)}): {self.out!r}"
                    self.out += data
        except BaseException:
            self.close()
            raise

    def interrupt(self) -> tuple[int, str]:
        """SIGINT, as Ctrl-C sends it; the exit status and all of stdout."""
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=HANG)
        return self.proc.returncode, (self.out + out).decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def server():
    yield from _closed_after_test(Server)


def test_serve_answers_concurrent_requests_and_stops_on_sigint(chat_gguf, server):
    srv = server(chat_gguf, "--parallel", 2, "--ctx", 1024, "--", "--no-webui")
    requests = [
        ("/completion", {"prompt": "Once upon a time", "n_predict": 8, "temperature": 0}),
        ("/completion", {"prompt": "The little dog played", "n_predict": 8, "temperature": 0}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "how are you"}], "max_tokens": 8,
                                  "temperature": 0}),
    ]
    alone = [post(srv.base + path, body) for path, body in requests]
    assert all(status == 200 and text for status, text in alone), alone
    for _ in range(2):  # 4 clients on 2 slots: batched together and queued
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: post(srv.base + r[0], r[1]), requests))
        assert together == alone
    status, out = srv.interrupt()
    assert status == 0
    assert f"mc2gguf: serving {chat_gguf.name} at {srv.base}" in out
    with pytest.raises(ConnectionRefusedError):  # the server is gone
        socket.create_connection(("127.0.0.1", srv.port), timeout=HANG).close()


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("command", ["chat", "serve"])
def test_missing_or_bad_model_file(command, tmp_path, capsys, llama_build):
    assert main([command, str(tmp_path / "missing.gguf")]) == 1
    assert f"model file {tmp_path / 'missing.gguf'} not found" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a model")
    assert main([command, str(tmp_path / "notes.txt")]) == 1
    assert "is not a GGUF file" in capsys.readouterr().err


def test_serve_port_in_use(chat_gguf, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", str(chat_gguf), "--port", str(s.getsockname()[1])]) == 1
    assert "cannot listen on 127.0.0.1 port" in capsys.readouterr().err


def test_arguments_after_double_dash_only_for_serve(capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", "m.gguf", "--", "-c", "5"])
    assert e.value.code == 2
    assert "only for `mc2gguf serve`" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- ODP switches

@pytest.fixture(scope="module")
def odp_gguf(chat_gguf) -> Path:
    """chat_gguf with ODP metadata (docs/gguf-layout.md): mu 0.5 in both layers, no token protected."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    out = chat_gguf.with_name("odp.gguf")
    reader = gguf.GGUFReader(chat_gguf)
    writer = gguf.GGUFWriter(out, arch=reader.fields["general.architecture"].contents(), endianess=reader.endianess)
    t = gguf.GGUFValueType
    copy_with_new_metadata(reader, writer, {
        "mc2gguf.odp.mu": MetadataDetails(t.ARRAY, [0.5, 0.5], sub_type=t.FLOAT32),
        "mc2gguf.odp.protect_norm": MetadataDetails(t.ARRAY, [1e9, 1e9], sub_type=t.FLOAT32),
        "mc2gguf.odp.protect_ratio": MetadataDetails(t.FLOAT32, 0.02),
    }, [])
    return out


def chat_once(model: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(cli("chat", model, "--max-tokens", 4, "--ctx", 512, "--temp", 0, "--threads", 1, *args),
                          input="hi\n", capture_output=True, text=True, env=ENV, cwd=REPO, timeout=HANG)


def test_chat_odp_switches(chat_gguf, odp_gguf, capsys, llama_build):
    """--moe-prune/--moe-protect reach llama.cpp where the build has ODP, and are refused clearly otherwise."""
    from mc2gguf.llama.runtime import bindings

    lib = bindings().llama_cpp._lib
    if not (hasattr(lib, "llama_set_moe_prune") and hasattr(lib, "llama_set_moe_protect_ratio")):
        assert main(["chat", str(chat_gguf), "--moe-prune", "on"]) == 1
        assert "this llama.cpp build lacks ODP support" in capsys.readouterr().err
        return
    for args in (["--moe-prune", "on"], ["--moe-prune", "off"], ["--moe-protect", "0.02"], ["--moe-protect", "1"]):
        proc = chat_once(odp_gguf, *args)
        assert proc.returncode == 0 and proc.stdout.strip(), (args, proc.stderr)
    proc = chat_once(chat_gguf, "--moe-prune", "on")  # no ODP metadata: nothing to prune
    assert proc.returncode == 0 and "--moe-prune on ignored" in proc.stderr
    proc = chat_once(odp_gguf, "--moe-protect", "0.3")  # no router-norm quantiles: only 0, 1 or the calibrated 0.02
    assert proc.returncode == 1 and "llama.cpp refused --moe-protect 0.3" in proc.stderr


def test_serve_odp_switches(odp_gguf, capsys, llama_build, server):
    from mc2gguf.llama.interactive import _server_help

    if "--moe-prune" not in _server_help(llama_build.binary("llama-server")):
        assert main(["serve", str(odp_gguf), "--moe-protect", "0.1", "--port", str(free_port())]) == 1
        assert "this llama.cpp build lacks ODP support" in capsys.readouterr().err
        return
    srv = server(odp_gguf, "--moe-prune", "on", "--moe-protect", "0.02", "--ctx", 512)
    status, text = post(srv.base + "/completion", {"prompt": "Once upon a time", "n_predict": 4, "temperature": 0})
    assert status == 200 and text
    # the response's timings count the routed and pruned expert slots, top-2 per token and layer: layer 0 routes
    # every token decoded (the prompt and every generated token but the last); llama.cpp computes the last
    # layer only for the tokens whose logits it outputs, one per generated token
    request = urllib.request.Request(srv.base + "/completion", json.dumps(
        {"prompt": "The little dog played", "n_predict": 6, "temperature": 0, "cache_prompt": False}).encode(),
        {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=HANG) as r:
        timings = json.loads(r.read())["timings"]
    decoded, generated = timings["prompt_n"] + timings["predicted_n"] - 1, timings["predicted_n"]
    assert timings["moe_routed_slots"] == 2 * decoded + 2 * generated, timings
    assert 0 < timings["moe_pruned_slots"] <= timings["moe_routed_slots"] // 2, timings
    assert srv.interrupt()[0] == 0


def test_llama_cli_reports_pruned_slots(odp_gguf, llama_build):
    """llama-cli's one-line report after an answer carries the pruned-slot counter (patch 0009)."""
    proc = subprocess.run([str(llama_build.binary("llama-cli")), "-m", str(odp_gguf), "-p", "Once upon a time",
                           "-n", "8", "--temp", "0", "-c", "512", "-t", "1", "-st"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"MoE pruned slots: (\d+) / (\d+) \(([\d.]+) %\)", proc.stdout + proc.stderr)
    assert found, (proc.stdout + proc.stderr)[-2000:]
    pruned, routed = int(found[1]), int(found[2])
    assert 0 < pruned <= routed // 2 and routed % 2 == 0


def test_serve_passes_odp_switches_when_llama_server_lists_them(monkeypatch, tmp_path):
    from mc2gguf.llama import interactive

    monkeypatch.setattr(interactive, "_server_help", lambda server: "--moe-prune [on|off] ...\n--moe-protect RATIO ...")
    assert interactive._odp_server_args(tmp_path, True, 0.02) == ["--moe-prune", "on", "--moe-protect", "0.02"]
    assert interactive._odp_server_args(tmp_path, False, None) == ["--moe-prune", "off"]
    monkeypatch.setattr(interactive, "_server_help", lambda server: "--moe-prune [on|off] ...")
    with pytest.raises(interactive.Mc2ggufError, match="lacks ODP support.*--moe-protect"):
        interactive._odp_server_args(tmp_path, None, 0.5)


def test_placement_flags_reach_llama_server():
    from mc2gguf.llama.interactive import Placement

    assert Placement().server_args() == [] and not Placement().requested()
    assert Placement(gpu_layers=-1, cpu_moe=True).server_args() == ["-ngl", "all", "--cpu-moe"]
    assert Placement(gpu_layers=20, n_cpu_moe=4).server_args() == ["-ngl", "20", "--n-cpu-moe", "4"]
    with pytest.raises(Mc2ggufError, match="--n-cpu-moe -1"):
        Placement(n_cpu_moe=-1)
    with pytest.raises(Mc2ggufError, match="--gpu-layers -2"):
        Placement(gpu_layers=-2)


def test_chat_and_serve_accept_placement_without_gpu(chat_gguf, server, llama_build):
    """On this CPU-only build the GPU placement flags are accepted, say that no GPU is in use, and change
    nothing; llama-server takes them (its expert patterns match type-group tensors as stock ones)."""
    from mc2gguf.llama.interactive import _gpu_offload

    if _gpu_offload():
        pytest.skip("a GPU build: the placement itself is checked on the GPU machine")
    plain = chat_once(chat_gguf)
    placed = chat_once(chat_gguf, "--gpu-layers", "99", "--cpu-moe")
    assert placed.returncode == 0 and "no GPU in use" in placed.stderr, placed.stderr[-2000:]
    assert placed.stdout == plain.stdout
    srv = server(chat_gguf, "--gpu-layers", "-1", "--n-cpu-moe", "1", "--ctx", 512)
    status, text = post(srv.base + "/completion", {"prompt": "Once upon a time", "n_predict": 4, "temperature": 0})
    assert status == 200 and text
    code, out = srv.interrupt()
    assert code == 0 and "no GPU in use" in out
