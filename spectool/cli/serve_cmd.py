"""`spectool serve`: put a draft and its target behind an OpenAI-compatible API."""

from __future__ import annotations

import signal
import socket

import typer

from spectool.cli.application import app
from spectool.cli.help import device_map_option, draft_option
from spectool.cli.render import handles_errors, print_runtime_messages
from spectool.errors import SpectoolError, UsageError
from spectool.hub import check_device_map
from spectool.paths import resolve_draft_dir

SERVE_EXTRA = 'serving needs FastAPI and uvicorn: pip install "spectool[serve]"'


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or a one-line error."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--host {host!r} is not an address this machine can listen on ({exc})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise SpectoolError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None
    return sock


@app.command("serve")
@handles_errors
def serve_command(
    draft: str = draft_option(),
    target: str = typer.Option(None, "--target", "-t", help="Target MODEL (default: the one the draft records)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port, printed)."),
    api_key: str = typer.Option(
        None, "--api-key", envvar="SPECTOOL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 requests."
    ),
    verify: str = typer.Option(
        "auto", "--verify", help="auto: draft only as much as pays each round (the fastest); full: draft all."
    ),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... \\[cuda when available, in bf16]."),
    device_map: str = device_map_option(),
) -> None:
    """Serve the target, sped up by the draft, through an OpenAI-compatible API: /v1/chat/completions and
    /v1/completions (streamed or not), /v1/models, /health. Greedy answers (temperature 0) are exactly the
    target's own. Answers are decoded one at a time, in arrival order. SIGTERM or Ctrl-C finishes the answers
    under way, then exits."""
    resolve_draft_dir(draft)  # before torch loads: a wrong path answers at once
    check_device_map(device_map, device)
    if verify not in ("auto", "full"):
        raise UsageError(f"--verify must be auto or full, got {verify!r}")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty: give the key clients must send, or leave it out")
    try:
        import uvicorn

        from spectool.serve import Server
    except ImportError:
        raise SpectoolError(SERVE_EXTRA) from None
    sock = listening_socket(host, port)
    from spectool.runtime import load_runtime

    runtime = load_runtime(draft, target, device=device, verify=verify, device_map=device_map)
    print_runtime_messages(runtime)
    server = Server(runtime, model_name=runtime.info.ref, api_key=api_key)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(
        f"serving {runtime.info.ref} with the {runtime.draft.method} draft {draft} at http://{shown}:{bound_port}/v1 "
        f"(model {runtime.info.ref!r}; --verify {verify}; one answer at a time, in arrival order)",
        flush=True,
    )
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal after its graceful shutdown
        signal.signal(sig, lambda number, _frame: stopped.append(number))
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=None, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    how = f" on {signal.Signals(stopped[0]).name}" if stopped else ""
    count = server.worker.answered
    print(f"stopped{how} after {count} answer{'' if count == 1 else 's'}", flush=True)
