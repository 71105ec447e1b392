"""One llama-server for every gunicorn worker: started by the master, attached to by the workers.

    LLAMA_PROC_MODEL=model.gguf gunicorn --preload -w 4 --threads 8 --chdir examples 'gunicorn_shared:app'

With ``--preload`` this module is imported once, in the master, before the workers are forked: the
master starts the server (and stops it when it exits); each worker talks to it through
:meth:`LlamaServer.attach`, a client that owns no process. Without ``--preload`` use
``flask_app.py`` instead: each worker then starts its own server on its first request.
"""

from __future__ import annotations

import os

from flask_app import relay_response

from llama_proc import LlamaServer, LlamaServerArgs, RemoteServer, shared_server
from llama_proc.remote import DEFAULT_ATTACHED_POOL_SIZE

#: gunicorn's worker count (-w, or WEB_CONCURRENCY): each worker keeps up to
#: DEFAULT_ATTACHED_POOL_SIZE connections, and each connection holds one of the server's HTTP threads
WORKERS = int(os.environ.get("WEB_CONCURRENCY", "4"))

# runs in the master (with --preload): the one server, with an HTTP thread for every worker connection
_args = LlamaServerArgs.from_env("LLAMA_PROC_")
if _args.threads_http is None:
    _args = _args.evolve(threads_http=WORKERS * DEFAULT_ATTACHED_POOL_SIZE + 8)
_master = shared_server(_args).ensure_started()
SERVER_URL = _master.base_url
API_KEY = _master.args.api_key
_MASTER_PID = os.getpid()
_client: RemoteServer | None = None


def _server() -> LlamaServer | RemoteServer:
    global _client
    if os.getpid() == _MASTER_PID:
        return _master
    if _client is None:  # one pooled client per worker process
        _client = LlamaServer.attach(SERVER_URL, API_KEY)
    return _client


app = relay_response(_server)
