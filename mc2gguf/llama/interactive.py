"""``mc2gguf chat`` and ``mc2gguf serve``: run a converted GGUF in the pinned, patched llama.cpp.

``chat`` talks to the model in this process through the llama-cpp-python bindings, with the file's own chat
template; ``serve`` runs the build's ``llama-server`` on the loopback interface.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import http.client
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from ..errors import Mc2ggufError
from .build import find_llama_build

_GGUF_MAGIC = b"GGUF"
_NO_ODP = ("this llama.cpp build lacks ODP support ({what}); rebuild it with `mc2gguf build-llama` (patches "
           "0005-0006)")


@dataclass(frozen=True)
class Placement:
    """Where llama.cpp keeps the weights, with its own options: ``gpu_layers`` layers in GPU memory (-1: all;
    None: the tool's default), the experts of every layer (``cpu_moe``) or of the first ``n_cpu_moe`` layers in
    system memory, the usual way to run a large MoE on a small GPU. The type-group tensors of a per-expert-type
    file (``blk.L.ffn_P_exps.G.weight``) match llama.cpp's expert patterns as the stock tensors do."""

    gpu_layers: int | None = None
    cpu_moe: bool = False
    n_cpu_moe: int | None = None

    def __post_init__(self) -> None:
        if self.gpu_layers is not None and self.gpu_layers < -1:
            raise Mc2ggufError(f"--gpu-layers {self.gpu_layers}: expected a number of layers, or -1 for all")
        if self.n_cpu_moe is not None and self.n_cpu_moe < 0:
            raise Mc2ggufError(f"--n-cpu-moe {self.n_cpu_moe}: expected a number of layers >= 0")

    def requested(self) -> bool:
        return self.gpu_layers is not None or self.cpu_moe or self.n_cpu_moe is not None

    def server_args(self) -> list[str]:
        args = []
        if self.gpu_layers is not None:
            args += ["-ngl", "all" if self.gpu_layers < 0 else str(self.gpu_layers)]
        if self.cpu_moe:
            args += ["--cpu-moe"]
        if self.n_cpu_moe is not None:
            args += ["--n-cpu-moe", str(self.n_cpu_moe)]
        return args


_NO_GPU = "no GPU in use: this llama.cpp build is CPU-only (--gpu-layers, --cpu-moe and --n-cpu-moe change nothing)"


def _gpu_offload() -> bool:
    from .runtime import bindings

    return bool(bindings().llama_supports_gpu_offload())


def check_model_file(path: Path) -> Path:
    """A readable GGUF file, or a clear error."""
    path = Path(path)
    if not path.exists():
        raise Mc2ggufError(f"model file {path} not found")
    if not path.is_file():
        raise Mc2ggufError(f"{path} is not a file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise Mc2ggufError(f"cannot read {path}: {e.strerror}") from None
    if magic != _GGUF_MAGIC:
        raise Mc2ggufError(f"{path} is not a GGUF file")
    return path


# ---------------------------------------------------------------------------------------------- chat

def _odp_library(moe_prune: bool | None, moe_protect: float | None):
    """libllama with the ODP switches, checked before a model is loaded; None when no switch is asked for."""
    if moe_prune is None and moe_protect is None:
        return None
    from .runtime import moe_api

    try:
        return moe_api()
    except AttributeError as e:  # ctypes: an undefined symbol
        raise Mc2ggufError(_NO_ODP.format(what=str(e))) from None


def _apply_odp(llm, lib, moe_prune: bool | None, moe_protect: float | None, model: Path,
               notice: Callable[[str], None]) -> None:
    """Call the switches on the context; both refuse (return false) a model without ODP metadata."""
    if moe_prune is not None and not lib.llama_set_moe_prune(llm.ctx, moe_prune) and moe_prune:
        notice(f"mc2gguf: warning: --moe-prune on ignored: {model.name} has no MoE pruning metadata "
               "(mc2gguf.odp.*; written by `mc2gguf convert --bpw/--size`)")
    if moe_protect is not None and not lib.llama_set_moe_protect_ratio(llm.ctx, moe_protect):
        raise Mc2ggufError(f"llama.cpp refused --moe-protect {moe_protect}: {model.name} has no MoE pruning "
                           "metadata, or no router-input norm quantiles for a ratio other than the calibrated one, "
                           "0 or 1")


class ChatSession:
    """A conversation with a loaded ``llama_cpp.Llama``: history, the chat template, streamed answers.

    The prompt is rendered by llama-cpp-python's Jinja2 chat formatter from the file's
    ``tokenizer.chat_template``, or from Mixtral-Instruct's ``[INST]`` template when the file has none. A
    system message goes to the template, or is prepended to the first user message when the template
    rejects or drops the system role (Mixtral-Instruct's does).

    Generation runs token by token (``Llama.generate``) rather than through ``create_chat_completion``: that
    would replace well-known templates (Mixtral-Instruct's among them) by hand-written formats, and its
    stream holds back all further text once the model emits bytes that are not valid UTF-8, so neither the
    text nor a Ctrl-C would get through until the answer ends.
    """

    def __init__(self, llm, system: str | None = None, max_tokens: int = 512, temperature: float = 0.8,
                 seed: int | None = None):
        from .runtime import bindings

        llama_cpp = bindings()
        self.llm, self.system, self.max_tokens, self.temperature = llm, system, max_tokens, temperature
        self.seed = llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed  # the default: a random seed
        self.history: list[dict[str, str]] = []
        self.template = llm.metadata.get("tokenizer.chat_template")
        self.template_from_file = bool(self.template)
        if not self.template_from_file:
            self.template = llama_cpp.llama_chat_format.MIXTRAL_INSTRUCT_CHAT_TEMPLATE

        def token_text(token: int) -> str:
            return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

        self.formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
            template=self.template, eos_token=token_text(llm.token_eos()), bos_token=token_text(llm.token_bos()))
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._is_end = lambda token: llama_cpp.llama_vocab_is_eog(vocab, token)
        self.system_in_template = system is None or self._template_keeps_system()

    def describe(self) -> str:
        what = ("the file's tokenizer.chat_template" if self.template_from_file else
                "no tokenizer.chat_template in the file: falling back to Mixtral-Instruct's [INST] format")
        if self.system is not None and not self.system_in_template:
            what += "; the template has no system role, so --system is prepended to the first user message"
        return what

    def _template_keeps_system(self) -> bool:
        marker = "mc2gguf-system-probe"
        try:
            prompt = self.formatter(messages=[{"role": "system", "content": marker},
                                              {"role": "user", "content": "hi"}]).prompt
        except Exception:  # raise_exception() in the template, or a Jinja error on the system role
            return False
        return marker in prompt

    def messages(self) -> list[dict[str, str]]:
        """What goes to the template: the system message (or its merged form) and the history."""
        if self.system is None:
            return list(self.history)
        if self.system_in_template:
            return [{"role": "system", "content": self.system}, *self.history]
        first, *rest = self.history
        return [{**first, "content": f"{self.system}\n\n{first['content']}"}, *rest]

    def prompt_tokens(self) -> list[int]:
        """The conversation rendered by the template (which writes BOS itself) and tokenized."""
        rendered = self.formatter(messages=self.messages())
        return self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def _fit_context(self, notice: Callable[[str], None]) -> list[int]:
        """Drop the oldest exchanges until the prompt leaves room for an answer; error if one message can't."""
        n_ctx = self.llm.n_ctx()
        reserve = self.max_tokens if 0 < self.max_tokens < n_ctx else n_ctx // 4
        prompt = self.prompt_tokens()
        while len(prompt) + reserve > n_ctx and len(self.history) > 1:
            del self.history[:2]
            notice(f"(dropped the oldest exchange to fit the {n_ctx}-token context)")
            prompt = self.prompt_tokens()
        if len(prompt) >= n_ctx:
            self.history.pop()
            raise Mc2ggufError(f"message too long: {len(prompt)} tokens with the template, context is {n_ctx} (--ctx)")
        return prompt

    def ask(self, text: str, write: Callable[[str], None], stop: Callable[[], bool] = lambda: False,
            notice: Callable[[str], None] = lambda s: None) -> str:
        """Stream the answer to ``text`` through ``write``, piece by piece as tokens come; ``stop()`` true ends
        it after the current token. The (possibly partial) answer joins the history."""
        self.history.append({"role": "user", "content": text})
        prompt = self._fit_context(notice)
        budget = self.llm.n_ctx() - len(prompt)
        if self.max_tokens > 0:
            budget = min(budget, self.max_tokens)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        self.llm.set_seed(self.seed)
        tokens = self.llm.generate(prompt, temp=self.temperature, top_k=40, top_p=0.95, min_p=0.05,
                                   repeat_penalty=1.0)
        try:
            for n, token in enumerate(tokens, 1):
                if self._is_end(token):
                    break
                piece = decoder.decode(self.llm.detokenize([token]))
                if piece:
                    parts.append(piece)
                    write(piece)
                if n >= budget or stop():
                    break
        finally:
            tokens.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            parts.append(tail)
            write(tail)
        answer = "".join(parts)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def reset(self) -> None:
        self.history.clear()


def load_model(model: Path, n_ctx: int, n_threads: int | None, placement: Placement = Placement()):
    from .runtime import bindings

    llama_cpp = bindings()
    kwargs = {"n_threads": n_threads} if n_threads else {}
    if placement.gpu_layers is not None:
        kwargs["n_gpu_layers"] = placement.gpu_layers
    try:
        return llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, verbose=False, **kwargs)
    except ValueError as e:
        raise Mc2ggufError(f"llama.cpp could not load {model}: {e}") from None


class _StopOnSigint:
    """While active, Ctrl-C asks the current answer to stop (a second Ctrl-C interrupts for real)."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def __call__(self) -> bool:
        return self.requested


def run_chat(model: Path, *, system: str | None = None, n_ctx: int = 4096, n_threads: int | None = None,
             max_tokens: int = 512, temperature: float = 0.8, seed: int | None = None,
             moe_prune: bool | None = None, moe_protect: float | None = None, placement: Placement = Placement(),
             stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """The chat loop. On a terminal: a prompt, line editing, Ctrl-C stops an answer, Ctrl-C/Ctrl-D or /exit
    at the prompt quits. Otherwise: one user message per input line, each answer on its own line(s)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if hasattr(stdout, "reconfigure"):  # a terminal that can't show some character gets "?", not a crash
        stdout.reconfigure(errors="replace")
    model = check_model_file(model)
    odp_lib = _odp_library(moe_prune, moe_protect)

    def notice(text: str) -> None:
        print(text, file=stderr, flush=True)

    if placement.requested() and not _gpu_offload():
        notice(f"mc2gguf chat: {_NO_GPU}")
    elif placement.cpu_moe or placement.n_cpu_moe is not None:
        # the bindings' Llama takes no tensor buffer overrides; llama-server does
        raise Mc2ggufError("chat keeps experts in system memory only on CPU-only builds so far: use "
                           "`mc2gguf serve --cpu-moe` / `--n-cpu-moe N`")
    llm = load_model(model, n_ctx, n_threads, placement)
    tty = stdin.isatty()
    sigint = signal.getsignal(signal.SIGINT)

    try:
        if odp_lib is not None:
            _apply_odp(llm, odp_lib, moe_prune, moe_protect, model, notice)
        session = ChatSession(llm, system, max_tokens=max_tokens, temperature=temperature, seed=seed)

        def write(piece: str) -> None:
            stdout.write(piece)
            stdout.flush()

        notice(f"mc2gguf chat: {model.name}, chat template: {session.describe()}")
        if tty:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            # Python keeps SIGINT ignored when it starts with it ignored (a shell script's `cmd &` does that), and
            # then Ctrl-C would not quit at the prompt; answers install their own handler either way
            signal.signal(signal.SIGINT, signal.default_int_handler)
            notice("Ctrl-C stops an answer; /reset clears the conversation; /exit, Ctrl-D or Ctrl-C quits.")
        while True:
            try:
                line = input("> ") if tty else stdin.readline()
            except (EOFError, KeyboardInterrupt):
                if tty:
                    print(file=stdout)
                return 0
            if not tty and not line:
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                session.reset()
                notice("(conversation cleared)")
                continue
            try:
                with _StopOnSigint() as stop:
                    session.ask(text, write, stop, notice)
            except Mc2ggufError as e:
                notice(f"mc2gguf: error: {e}")
                continue
            write("\n")
            if stop.requested:
                notice("(answer stopped)")
    finally:
        if tty:  # quitting: a ^C pressed again while llama.cpp frees the model must not end in a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        llm.close()
        if tty:
            signal.signal(signal.SIGINT, sigint)


# --------------------------------------------------------------------------------------------- serve

@functools.cache
def _server_help(server: Path) -> str:
    proc = subprocess.run([str(server), "--help"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    return proc.stdout + proc.stderr


def _odp_server_args(server: Path, moe_prune: bool | None, moe_protect: float | None) -> list[str]:
    args = []
    if moe_prune is not None:
        args += ["--moe-prune", "on" if moe_prune else "off"]
    if moe_protect is not None:
        args += ["--moe-protect", repr(moe_protect)]
    for flag in args[::2]:
        if flag not in _server_help(server):
            raise Mc2ggufError(_NO_ODP.format(what=f"`llama-server --help` does not list {flag}"))
    return args


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama-server: recent connections don't count
        try:
            s.bind((host, port))
        except OSError as e:
            raise Mc2ggufError(f"cannot listen on {host} port {port}: {e.strerror} (choose another with --port)") \
                from None


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if mc2gguf dies (the server has its own process group)."""
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass


def _announce_when_ready(proc: subprocess.Popen, url: str, model: Path, out: TextIO) -> None:
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    print(f"mc2gguf: serving {model.name} at {url} (OpenAI-compatible API under {url}/v1); "
                          "Ctrl-C stops", file=out, flush=True)
                    return
        except (OSError, http.client.HTTPException):  # not listening yet, or 503 while the model loads
            pass
        time.sleep(0.25)


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def run_server(model: Path, *, host: str = "127.0.0.1", port: int = 8080, n_ctx: int | None = 4096,
               n_threads: int | None = None, parallel: int | None = None, moe_prune: bool | None = None,
               moe_protect: float | None = None, placement: Placement = Placement(), extra: list[str] = (),
               stdout: TextIO | None = None) -> int:
    """Run ``llama-server`` in the foreground; signals go to it; its exit status is returned
    (128 + N when signal N ended it)."""
    stdout = stdout or sys.stdout
    model = check_model_file(model)
    server = find_llama_build().binary("llama-server")
    cmd = [str(server), "-m", str(model), "--host", host, "--port", str(port)]
    if n_ctx is not None:
        cmd += ["-c", str(n_ctx)]
    if n_threads:
        cmd += ["-t", str(n_threads)]
    if parallel:
        cmd += ["-np", str(parallel)]
    cmd += _odp_server_args(server, moe_prune, moe_protect)
    cmd += placement.server_args()
    cmd += list(extra)
    if placement.requested() and not _gpu_offload():
        print(f"mc2gguf: {_NO_GPU}", file=stdout, flush=True)
    _check_port(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mc2gguf: warning: listening on {host}, not only on this machine's loopback interface; llama-server "
              "has no authentication unless given `-- --api-key KEY`", file=sys.stderr, flush=True)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"mc2gguf: starting llama-server for {model} on {url}", file=stdout, flush=True)
    # Own process group: a terminal's Ctrl-C reaches only us and is forwarded once (llama-server treats a
    # second SIGINT as "terminate immediately").
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    previous = {sig: signal.signal(sig, lambda signum, frame: proc.send_signal(signum)) for sig in FORWARDED_SIGNALS}
    try:
        threading.Thread(target=_announce_when_ready, args=(proc, url, model, stdout), daemon=True).start()
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # we are leaving on an exception: don't leave the server behind
            proc.terminate()
            proc.wait()
    return status if status >= 0 else 128 - status
