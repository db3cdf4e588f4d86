"""The baseline for ``bench/execute.py``: an idiomatic FastAPI endpoint doing no work.

``POST /execute`` parses the same JSON body the gateway receives (a FastAPI body
parameter) and returns a constant JSON object. Served like the gateway: one
uvicorn worker, log level warning, no access log. It is what the HTTP stack alone
costs on this machine, so the gateway's figures can be read against it.

Run: ``python bench/baseline_app.py --port 8090``.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Any

import uvicorn
from fastapi import Body, FastAPI

app = FastAPI(title="ExecGuard benchmark baseline")

_ANSWER: dict[str, Any] = {"decision": "PERMIT", "surface": "payment.execute",
                           "reasonCode": "BASELINE"}


@app.post("/execute")
async def execute(body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    """Parse the body, answer a constant."""
    return _ANSWER


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    """Ready as soon as it serves."""
    return {"status": "ready"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
