"""Serves the BigQuery emulator as ``local-bigquery serve`` does, except that a stop drains its gRPC server.

Run by the emulator's own interpreter (its venv, Python 3.13), so it imports nothing from this project.

``local-bigquery serve`` ends its gRPC server with ``stop(None)``, which cancels the calls in flight at once,
while their handler threads still finish (the interpreter joins them at exit). An append being written at that
moment is therefore stored but never answered: the writer cannot tell it from one that was not stored, and
since the emulator forgets its write streams when it stops, it cannot ask the stream either. A managed
service drains instead, and so does this: the calls in flight are answered (up to ``DRAIN_SECONDS``), and a
call arriving during the stop is refused with UNAVAILABLE before anything is written. Either way the writer
knows what happened (docs/bigquery.md, "When the emulator restarts").

Its gRPC server also takes requests as large as BigQuery does (AppendRows: 10 MB). ``local-bigquery serve`` keeps
gRPC's default of 4 MiB, which refused a busy HTTP sink's intent append (4 MiB of payloads and their metadata) as
RESOURCE_EXHAUSTED, and the writer retried it until the job stopped (docs/benchmarks.md, session 16).
"""

from __future__ import annotations

import sys
from pathlib import Path

DRAIN_SECONDS = 10.0
MAX_REQUEST_BYTES = 10 * 1024 * 1024
"""BigQuery's AppendRows limit (10 MB), in gRPC's units; the writers stop their requests short of it."""


def start_grpc(host: str, port: int):  # noqa: ANN201 - grpc is the emulator venv's, not this project's
    """``local_bigquery.grpc.server.start`` with BigQuery's request size limit instead of gRPC's default."""
    import concurrent.futures

    import grpc
    from local_bigquery.grpc import server

    grpc_server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
    )
    grpc_server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(name, handlers) for name, handlers in server.SERVICES.items()]
    )
    grpc_server.add_insecure_port(f"{host}:{port}")
    grpc_server.start()
    return grpc_server


def main(argv: list[str]) -> None:
    import uvicorn
    from local_bigquery.settings import settings

    host, port, grpc_port, project, dataset, data_dir = argv
    settings.bigquery_host = host
    settings.bigquery_port = int(port)
    settings.grpc_port = int(grpc_port)
    settings.default_project_id = project
    settings.default_dataset_id = dataset
    settings.data_dir = Path(data_dir)
    grpc_server = start_grpc(host, int(grpc_port))
    try:
        uvicorn.run("local_bigquery:app", host=host, port=int(port))  # returns on SIGTERM or SIGINT
    finally:
        grpc_server.stop(DRAIN_SECONDS).wait()


if __name__ == "__main__":
    main(sys.argv[1:])
