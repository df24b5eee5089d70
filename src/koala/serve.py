"""`koala serve`: an OpenAI-compatible HTTP server (chat + text completions, streaming or not).

The engine (koala.engine) batches every request in flight through one decode loop; the HTTP layer (FastAPI, an
optional extra, koala.openai_api) only accepts, validates and streams, and is imported only when the server starts,
so the CLI works without it.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys

from koala.args import (add_drafter_args, add_sampling_args, add_target_args, non_negative_int, port, positive_float,
                        positive_int)
from koala.build import drafter_from_args, sampling_from_args, target_from_args
from koala.engine import Limits


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401

        from koala.openai_api import create_app
    except ImportError as e:
        raise RuntimeError("`koala serve` needs FastAPI and uvicorn: pip install 'koala[serve]'") from e


    if not _is_loopback(args.host) and not args.api_key:
        print(f"koala: warning: binding {args.host} without --api-key: anyone who can reach this address can use "
              f"the model.", file=sys.stderr)
    limits = Limits(args.max_tokens_cap, args.max_prompt_tokens, args.max_body_bytes, args.max_messages,
                    args.max_stop_chars, args.request_timeout, args.max_batch, args.max_waiting,
                    args.allow_special_tokens, args.api_key)
    target = target_from_args(args)
    app = create_app(target, drafter_from_args(args, target), sampling_from_args(args), args.max_new_tokens,
                     args.acceptance, args.model_name, limits)
    uvicorn_server(app, host=args.host, port=args.port, log_level=args.log_level).run()
    return 0


def uvicorn_server(app, **config):
    """A uvicorn server for `create_app`'s app that cuts the answers in flight as soon as it is told to exit
    (SIGINT/SIGTERM); uvicorn alone would wait for every open response to finish."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.engine.shutdown()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, **config))


def add_command(sub) -> None:

    d = Limits()
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the target's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: none)")
    g = p.add_argument_group("limits (a request asking for more gets a 4xx)")
    g.add_argument("--max-tokens-cap", type=positive_int, default=d.max_tokens_cap,
                   help="most new tokens a request may ask for (default: --max-new-tokens, the default answer)")
    g.add_argument("--max-prompt-tokens", type=positive_int, default=d.max_prompt_tokens,
                   help="longest prompt accepted, in tokens (default: the target's context)")
    g.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes)
    g.add_argument("--max-messages", type=positive_int, default=d.max_messages)
    g.add_argument("--max-stop-chars", type=positive_int, default=d.max_stop_chars, help="per stop string")
    g.add_argument("--request-timeout", type=positive_float, default=d.request_timeout,
                   help="seconds; a longer answer is cut (finish_reason 'length')")
    g.add_argument("--max-batch", type=positive_int, default=d.max_batch, help="requests decoded together")
    g.add_argument("--max-waiting", type=non_negative_int, default=d.max_waiting,
                   help="requests queued behind a full batch; more are answered 503")
    g.add_argument("--allow-special-tokens", action="store_true",
                   help="let special-token text in content (e.g. '<|im_start|>') act as control tokens; by default "
                        "such requests are refused, so a user cannot fake a system turn")
    add_target_args(p)
    add_drafter_args(p)
    add_sampling_args(p)  # the defaults for requests that leave temperature/top_p/top_k/max_tokens out
    p.set_defaults(func=_serve)
