"""``execguard proxy``: the HTTP execution proxy in front of an upstream API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from execguard.cli._common import app, out


@app.command()
def proxy(
    config: Annotated[Path, typer.Option("--config", help="The proxy's TOML configuration "
                                         "(see docs/PROXY.md).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8090,
) -> None:
    """Serve the execution proxy: forward governed routes only after PERMIT + consume."""
    import logging

    from execguard.gate.proxy import create_proxy_app, load_proxy_config
    from execguard.ledger import redact_url
    from execguard.server.run import serve_until_signalled

    settings = load_proxy_config(config)  # a ConfigError exits 1 with one line naming the key
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s "
                        "%(message)s")
    # httpx logs each request's whole URL at INFO: the gateway's may hold a password, a
    # forwarded request's query a caller's token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    application = create_proxy_app(settings)
    paths = [f"{r.method} {r.path} -> {r.surface}" for r in settings.routes]
    if settings.litellm is not None:
        paths.append(f"POST /proxy/execute -> {settings.litellm.upstream_path}")
    out.print(f"ExecGuard proxy on http://{host}:{port}  (gateway "
              f"{redact_url(settings.gateway.url)}; "
              f"{len(paths)} governed endpoint{'s' if len(paths) != 1 else ''})")
    for line in paths:
        out.print(f"  {line}")
    serve_until_signalled(application, host, port)  # type: ignore[arg-type]
