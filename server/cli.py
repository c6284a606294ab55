"""``microturn`` command line: ``microturn serve [--host H] [--port P] [--engine E]``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os

from model.interface import TURN_MS
from model.text import RESULT_LABELS
from server.config import ServerConfig
from server.engine import ENGINES

# ServerConfig limits with a flag each (--max-session-s, ...): type and default come
# from the config, so a limit is declared once.
LIMIT_FLAGS = {
    "max_session_s": "end sessions after this long, gracefully (0: no limit)",
    "peer_timeout_s": "free a session whose peer sent nothing for this long",
    "drain_timeout_s": "on SIGTERM, how long sessions may finish their reply and tasks",
    "max_message_bytes": "largest data-channel message",
    "messages_per_second": "data-channel messages a session may send per second, on average",
    "message_burst": "... and in a burst",
    "max_tasks_per_session": "background tasks running at once per session",
    "max_text_chars": "longest text.input",
    "max_text_backlog_bytes": "text (bytes) that may wait to enter the model before a text.input is refused",
    "max_offer_bytes": "largest SDP offer",
}

# Commands that parse their own options: the module whose main() takes the rest of argv.
OWN_OPTIONS = {
    "sample": "model.conversations",
    "eval": "model.evaluate",
    "train": "model.train",
    "average": "model.average",
    "compare": "model.compare",
    "loadtest": "loadtest.run",
    "router": "server.router",
}


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="microturn", description="Real-time serving for interaction models.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the web page, signalling and the engine")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--engine", choices=ENGINES, default=defaults.engine,
        help="what steps the sessions: the interaction model, or 'echo' (diagnostic: you hear yourself 200 ms later)",
    )
    serve.add_argument("--checkpoint", default=defaults.checkpoint,
                       help="model checkpoint directory, or 'random' (default: the shipped checkpoints/tiny)")
    serve.add_argument("--max-sessions", type=int, default=defaults.max_sessions)
    serve.add_argument("--device", default=defaults.device,
                       help="where the model steps: cpu (default) or cuda (the GPU image)")
    serve.add_argument(
        "--ice-server", action="append", default=[], metavar="URL",
        help="STUN/TURN server URL (repeatable); none by default, so nothing leaves the machine",
    )
    serve.add_argument(
        "--ice-host", action="append", default=[], metavar="ADDR",
        help="extra local address to offer as an ICE host candidate, e.g. 127.0.0.1 (repeatable)",
    )
    serve.add_argument("--turn-secret", default=os.environ.get("MICROTURN_TURN_SECRET"),
                       help="secret shared with the TURN server (coturn use-auth-secret): per-session "
                            "short-lived TURN credentials (or MICROTURN_TURN_SECRET)")
    serve.add_argument("--turn-username", default=None, help="static TURN username (without --turn-secret)")
    serve.add_argument("--turn-credential", default=os.environ.get("MICROTURN_TURN_CREDENTIAL"),
                       help="static TURN password (or MICROTURN_TURN_CREDENTIAL)")
    serve.add_argument("--auth-token", action="append", default=[], metavar="TOKEN",
                       help="accept this bearer token on signalling (repeatable; also MICROTURN_AUTH_TOKENS, "
                            "comma-separated)")
    serve.add_argument("--auth-secret", default=os.environ.get("MICROTURN_AUTH_SECRET"),
                       help="accept tokens minted by `microturn token` with this secret (or MICROTURN_AUTH_SECRET)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="let pages from this origin use signalling (repeatable; '*' for any)")
    serve.add_argument("--router", default=None, metavar="URL",
                       help="report free capacity to `microturn router` at URL")
    serve.add_argument("--advertise", default=None, metavar="URL",
                       help="this server's URL as clients reach it (required with --router)")
    serve.add_argument("--playout-delay-ms", type=float, default=defaults.playout_delay_ms)
    serve.add_argument("--batch-window-ms", type=float, default=defaults.batch_window_ms,
                       help="how long a step waits for the chunks of sessions not yet ready")
    serve.add_argument("--jitter-prefetch", type=int, default=defaults.jitter_prefetch,
                       help="incoming audio packets held before release (aiortc's default: 4)")
    serve.add_argument("--aiortc-encoder", action="store_true",
                       help="hand aiortc raw frames to encode (slower; for A/B benchmarks)")
    serve.add_argument("--capacity", type=int, default=None,
                       help="sessions admitted before 503 (default: measured at start-up)")
    serve.add_argument("--capacity-budget", type=float, default=defaults.capacity_budget,
                       help="fraction of the 200 ms turn a step may take at capacity (default 0.6)")
    limits = serve.add_argument_group("limits (each refusal is a clear error: HTTP JSON or an `error` event)")
    for field, help_text in LIMIT_FLAGS.items():
        default = getattr(defaults, field)
        limits.add_argument("--" + field.replace("_", "-"), type=type(default), default=default,
                            help=f"{help_text} (default {default:g})")
    serve.add_argument("--record-dir", default=None, metavar="DIR",
                       help="offer session recordings (crash-safe, docs/recording.md) into DIR; each session "
                            "is recorded only if its client consents (?record=1)")
    serve.add_argument("--llm-url", default=None, help="OpenAI-compatible API base URL for the 'chat' tool")
    serve.add_argument("--llm-model", default=defaults.llm_model)
    serve.add_argument("--log-level", default="info")

    commands.add_parser("router", help="send new sessions to servers with room (see microturn router --help)",
                        add_help=False)
    token = commands.add_parser("token", help="mint a short-lived bearer token for signalling")
    token.add_argument("--secret", default=os.environ.get("MICROTURN_AUTH_SECRET"),
                       help="the servers' --auth-secret (or MICROTURN_AUTH_SECRET)")
    token.add_argument("--ttl", type=float, default=3600, help="seconds until it expires (default 3600)")
    token.add_argument("--subject", default="", help="who it is for (kept in the token)")
    commands.add_parser("eval", help="evaluate the model on held-out conversations (--json)", add_help=False)
    commands.add_parser("train", help="train the interaction model (see microturn train --help)", add_help=False)
    commands.add_parser("average", help="a checkpoint whose weights are the mean of others' (see microturn "
                        "average --help)", add_help=False)
    commands.add_parser("compare", help="two checkpoints' `eval --records`, event by event, with a sign test",
                        add_help=False)
    commands.add_parser("loadtest", help="simulated WebRTC peers against a server (see microturn loadtest --help)",
                        add_help=False)
    commands.add_parser("sample", help="render a synthetic training conversation to a WAV "
                        "(--seed N --held-out --seconds S --out FILE)", add_help=False)

    bench = commands.add_parser("bench", help="run a benchmark (see bench/)")
    bench.add_argument("target", choices=["model"], help="what to measure")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options, e.g. --json")
    return parser


def serve(args: argparse.Namespace) -> None:
    import uvicorn
    from opentelemetry import trace

    from server.app import create_app
    from server.telemetry import build_tracer_provider

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        engine=args.engine,
        checkpoint=None if args.checkpoint == "random" else args.checkpoint,
        max_sessions=args.max_sessions,
        device=args.device,
        ice_servers=args.ice_server,
        ice_host_addresses=args.ice_host,
        playout_delay_ms=args.playout_delay_ms,
        jitter_prefetch=args.jitter_prefetch,
        batch_window_ms=args.batch_window_ms,
        pre_encode_opus=not args.aiortc_encoder,
        capacity=args.capacity,
        capacity_budget=args.capacity_budget,
        llm_url=args.llm_url,
        llm_model=args.llm_model,
        llm_api_key=os.environ.get("MICROTURN_LLM_API_KEY"),
        turn_secret=args.turn_secret,
        turn_username=args.turn_username,
        turn_credential=args.turn_credential,
        auth_tokens=args.auth_token + [t for t in os.environ.get("MICROTURN_AUTH_TOKENS", "").split(",") if t],
        auth_secret=args.auth_secret,
        cors_origins=args.cors_origin,
        router_url=args.router,
        advertise_url=args.advertise,
        record_dir=args.record_dir,
        **{field: getattr(args, field) for field in LIMIT_FLAGS},
    )
    if config.router_url and not config.advertise_url:
        raise SystemExit("--router needs --advertise URL: the address clients reach this server at")
    provider = build_tracer_provider()
    trace.set_tracer_provider(provider)
    app = create_app(config, provider)
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", log_level=args.log_level)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in OWN_OPTIONS:  # imported only when used: training and evaluation pull in torch
        importlib.import_module(OWN_OPTIONS[args.command]).main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "serve":
        if not 0 <= args.batch_window_ms < TURN_MS:
            parser.error(f"--batch-window-ms must be in [0, {TURN_MS}), got {args.batch_window_ms}")
        if not 1 <= args.max_tasks_per_session <= RESULT_LABELS:  # each running task's result needs its label
            parser.error(f"--max-tasks-per-session must be in [1, {RESULT_LABELS}], got {args.max_tasks_per_session}")
        serve(args)
    elif args.command == "token":
        from server.auth import mint_token

        if not args.secret:
            parser.error("token needs --secret (or MICROTURN_AUTH_SECRET)")
        print(mint_token(args.secret, args.ttl, args.subject))
    elif args.command == "bench":
        from bench.model import main as bench_model

        bench_model(args.args)


if __name__ == "__main__":
    main()
