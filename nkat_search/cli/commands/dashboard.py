"""``nkat-search dashboard``: optuna-dashboard for a storage, bound to 127.0.0.1 unless asked.

The dashboard has no authentication, so the default host is the loopback interface; reach it from
another machine through an SSH tunnel, or pass ``--host 0.0.0.0`` on a trusted network.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

from nkat_search.cli.commands.storage_arg import add_storage_argument, resolve_storage
from nkat_search.errors import UserError
from nkat_search.search.storage_url import mask_url

HELP = ("Serve optuna-dashboard for every study in --storage and print its URL. Binds to "
        "127.0.0.1 by default (the dashboard has no login); use an SSH tunnel "
        "(ssh -L 8080:127.0.0.1:8080 host) or --host 0.0.0.0 on a trusted network. "
        "Ctrl-C stops it.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_storage_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (0: any free one)")


def check_port(port: int, low: int = 0) -> int:
    """A TCP port is ``low``..65535 (0: any free one); anything else is one line, not a traceback."""
    if not low <= port <= 65535:
        raise UserError(f"--port: {port} is out of range; a TCP port is {low}..65535")
    return port


def run(args: argparse.Namespace) -> int:
    # optuna: not for --help.
    from nkat_search.search.dashboard_storage import DashboardStorage
    from nkat_search.search.report import open_storage_for_reading

    check_port(args.port)
    args.storage = resolve_storage(args.storage)
    # What the dashboard shows of constraints, the best trial and pruned trials: see there.
    storage = open_storage_for_reading(args.storage, storage_class=DashboardStorage)
    server = make_server(storage, args.host, args.port)
    print(f"optuna-dashboard for {mask_url(args.storage)}: {url(args.host, server.server_port)} "
          "(Ctrl-C to stop)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {args.host}; the dashboard has no authentication", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def make_server(storage, host: str, port: int):
    """A threaded wsgiref server for the dashboard's WSGI app, bound but not yet serving.

    Threaded, because the dashboard's page polls several API routes at once and one slow
    PostgreSQL query should not stall the rest. Request logging is off: ``up`` shows its own line.
    """
    # optuna_dashboard (optuna) and the WSGI server (40 ms, a quarter of `up --help`): when serving.
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
    from wsgiref.simple_server import make_server as wsgi_make_server

    import optuna_dashboard

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            pass

    app = with_learning_curves(optuna_dashboard.wsgi(storage))
    try:
        return wsgi_make_server(host, port, app, server_class=Server, handler_class=QuietHandler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; pass another --port") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"cannot bind to {host}: no such local address") from None
        raise


# optuna-dashboard 0.21's "Intermediate values" chart, as its bundle writes it, and what it
# should be for this service: the chart leaves out a pruned trial unless it has a value (the
# storage view takes a pruned trial's value away, since it is a Local TPE and not a Global TPE),
# so the search's pruning was invisible; its axes say "Objective Value" and "Step" whatever the
# study reports. The chart has no option for either, so the served bundle is patched.
BUNDLE_PATCHES = (
    ('!n&&"Pruned"===e.state&&e.values&&e.values.length>0', '!n&&"Pruned"===e.state'),
    ('yaxis:{title:"Objective Value",type:i?"log":"linear"},xaxis:{title:"Step",type:"linear"}',
     'yaxis:{title:"%s",type:i?"log":"linear"},xaxis:{title:"Epoch",type:"linear"}'),
    ('"Running"===e.state?"(running)":t?"":"(infeasible)"',
     '"Running"===e.state?"(running)":"Pruned"===e.state?"(pruned)":t?"":"(infeasible)"'),
)
BUNDLE_PATH = "/static/bundle.js"


def patched_bundle() -> tuple[bytes | None, list[str]]:
    """(optuna-dashboard's bundle with ``BUNDLE_PATCHES`` applied, the patches not found).

    None when no patch applies (another dashboard version): its own bundle is then served.
    """
    import optuna_dashboard  # optuna: not for --help

    from nkat_search.search.trials import INTERMEDIATE_NAME

    text = (Path(optuna_dashboard.__file__).parent / "public" / "bundle.js").read_text()
    missing = []
    for old, new in BUNDLE_PATCHES:
        if old not in text:
            missing.append(old)
        text = text.replace(old, new.replace("%s", INTERMEDIATE_NAME))
    if len(missing) == len(BUNDLE_PATCHES):
        return None, missing
    return text.encode(), missing


def with_learning_curves(app):
    """The dashboard's WSGI ``app``, serving ``patched_bundle`` for its script."""
    bundle, missing = patched_bundle()
    if missing:
        print(f"nkat-search dashboard: {len(missing)} of {len(BUNDLE_PATCHES)} chart fixes do not "
              "apply to this optuna-dashboard version (pruned trials' curves or the axis names "
              "may be as it draws them)", file=sys.stderr, flush=True)
    if bundle is None:
        return app

    def serve(environ, start_response):
        if environ.get("PATH_INFO") != BUNDLE_PATH:
            return app(environ, start_response)
        start_response("200 OK", [("Content-Type", "application/javascript; charset=utf-8"),
                                  ("Content-Length", str(len(bundle))),
                                  ("Cache-Control", "no-cache")])
        return [bundle]

    return serve


def find_free_port(host: str, start: int, tries: int = 50) -> int:
    """The first port from ``start`` on that ``host`` can bind now (same reuse rules as the server)."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise UserError(f"no free port on {host} between {start} and {start + tries - 1}; pass --port")


def url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    return f"http://{shown}:{port}/"
