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

from llama_proc import LlamaServer, LlamaServerArgs, shared_server

# runs in the master (with --preload): the one server
_master = shared_server(LlamaServerArgs.from_env("LLAMA_PROC_")).ensure_started()
SERVER_URL = _master.base_url
API_KEY = _master.args.api_key
_MASTER_PID = os.getpid()
_client: LlamaServer | None = None


def _server() -> LlamaServer:
    global _client
    if os.getpid() == _MASTER_PID:
        return _master
    if _client is None:  # one pooled client per worker process
        _client = LlamaServer.attach(SERVER_URL, API_KEY)
    return _client


app = relay_response(_server)
