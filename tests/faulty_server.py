"""`sdserve serve`'s app with one extra route that raises, for the unhandled-error tests:
`python tests/faulty_server.py PORT` (settings from the SDSERVE_* environment)."""

from __future__ import annotations

import sys

import uvicorn

from sdserve.api.app import create_app
from sdserve.settings import Settings


class DeliberateBug(RuntimeError):
    pass


def main(port: int) -> None:
    app = create_app(Settings(host="127.0.0.1", port=port))

    @app.post("/test/raise", include_in_schema=False)
    async def raise_a_bug():
        raise DeliberateBug("a deliberate bug")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=75)


if __name__ == "__main__":
    main(int(sys.argv[1]))
