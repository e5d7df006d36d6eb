"""`seekserve` command line. Subcommands: serve (the HTTP server), generate (offline, native engine),
keys (API keys), db (migrations)."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", required=True, help="Hugging Face model folder (or hub id org/name)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations dtype (default: the checkpoint's; float16 on CPU -> bfloat16)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, default=64, help="max sequences per engine step (default 64)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="max prompt + output tokens per sequence (default: the model's limit)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="devices per model (only 1 is supported)")
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache budget in GiB (default: 30%% of free memory)")


def _cmd_generate(a: argparse.Namespace) -> int:
    from seekserve.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model_path=a.model_path, dtype=a.dtype, device=a.device,
                                    max_num_seqs=a.batch_size, max_model_len=a.max_sequence_length,
                                    tensor_parallel_size=a.tensor_parallel, kv_cache_memory_gb=a.kv_cache_memory))
    params = SamplingParams(temperature=a.temperature, max_tokens=a.max_tokens, seed=a.seed)
    prompts = a.prompts
    if a.chat:
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        prompts = [engine.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    for out in engine.generate(prompts, params):
        print(out.text)
    return 0


def describe_validation_error(e) -> str:
    """pydantic's message without the rejected values: a mistyped setting may be a secret."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
                     for err in e.errors(include_url=False, include_input=False))


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    """Every flag maps to a Settings field; unset flags fall through to SEEKSERVE_* env, then the file."""
    from pydantic_core import PydanticUndefined

    from seekserve.config import Settings

    fields = Settings.model_fields

    def add(flag: str, dest: str, **kw) -> None:
        default_note = fields[dest].default
        help_text = fields[dest].description or ""
        if default_note not in (None, [], "", PydanticUndefined):
            help_text += f" (default: {default_note})"
        p.add_argument(flag, dest=dest, default=None, help=f"{help_text} [env SEEKSERVE_{dest.upper()}]", **kw)

    p.add_argument("--config", dest="config_file", default=None,
                   help="YAML file of settings (default: /etc/seekserve/config.yaml if it exists) [env SEEKSERVE_CONFIG]")
    add("--host", "host")
    add("--port", "port", type=int)
    add("--model-path", "model_path")
    add("--served-model-name", "served_model_name", nargs="+")
    add("--dtype", "dtype", choices=["auto", "float32", "bfloat16", "float16"])
    add("--device", "device")
    add("--batch-size", "batch_size", type=int)
    add("--max-sequence-length", "max_sequence_length", type=int)
    add("--tensor-parallel", "tensor_parallel", type=int)
    add("--kv-cache-memory", "kv_cache_memory", type=float)
    add("--max-num-batched-tokens", "max_num_batched_tokens", type=int)
    add("--enable-prefix-caching", "enable_prefix_caching", action=argparse.BooleanOptionalAction)
    add("--reasoning-parser", "reasoning_parser", choices=["auto", "deepseek-r1", "none"])
    add("--api-key", "api_key", nargs="+")
    add("--max-queued-requests", "max_queued_requests", type=int)
    add("--max-request-body-bytes", "max_request_body_bytes", type=int)
    add("--drain-timeout", "drain_timeout", type=float)
    add("--keepalive-interval", "keepalive_interval", type=float)
    add("--log-level", "log_level", choices=["debug", "info", "warning", "error"])
    add("--data-dir", "data_dir")
    add("--database-url", "database_url")
    add("--allow-unauthenticated", "allow_unauthenticated", action=argparse.BooleanOptionalAction)
    add("--redis-url", "redis_url")
    add("--rate-limit-failure-mode", "rate_limit_failure_mode", choices=["open", "closed"])
    add("--vip-reserved-share", "vip_reserved_share", type=float)
    add("--site", "site")
    add("--default-max-tokens-reservation", "default_max_tokens_reservation", type=int)


def _cmd_serve(a: argparse.Namespace) -> int:
    from seekserve.config import load_settings
    from seekserve.server import serve

    flags = {k: v for k, v in vars(a).items() if k not in ("command", "func", "config_file")}
    settings = load_settings(flags, a.config_file)   # a bad setting: reported by main()
    logging.getLogger().setLevel(settings.log_level.upper())
    return serve(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seekserve", description="Self-hosted DeepSeek-compatible model server",
        epilog="Settings precedence for serve: command-line flags > SEEKSERVE_* environment > config file > defaults.")
    sub = parser.add_subparsers(dest="command", required=True)
    from seekserve.config import FILE_ONLY_SETTINGS

    srv = sub.add_parser("serve", help="serve the OpenAI/DeepSeek-compatible HTTP API",
                         description="Serve a model over the OpenAI/DeepSeek-compatible HTTP API. With no "
                                     "--model-path, the tiny model shipped with seekserve. Precedence: flags > "
                                     "SEEKSERVE_* environment > config file > defaults.",
                         epilog="Set in the config file or the environment only (docs/configuration.md): "
                                + ", ".join(FILE_ONLY_SETTINGS) + " (e.g. SEEKSERVE_KEY_PEPPER, "
                                "SEEKSERVE_RESPONSE_CACHE__ENABLED=true).")
    _add_serve_args(srv)
    srv.set_defaults(func=_cmd_serve)
    gen = sub.add_parser("generate", help="generate text offline with the native engine")
    _add_engine_args(gen)
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_cmd_generate)
    from seekserve.cli_admin import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)   # one line per plugin at start-up
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from seekserve.config import ConfigFileError
    from seekserve.gateway.bootstrap import SetupError
    from seekserve.store.db import StoreError
    from seekserve.store.keys import KeyStoreError

    try:
        return args.func(args)
    except ValidationError as e:
        print(f"seekserve: invalid settings: {describe_validation_error(e)}", file=sys.stderr)
        return 2
    except ConfigFileError as e:
        print(f"seekserve: invalid settings: {e}", file=sys.stderr)
        return 2
    except (KeyStoreError, StoreError, SetupError, ValueError) as e:
        print(f"seekserve: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # the engine's errors (a model that cannot load ...); imported here because importing the engine
        # loads torch, which the key and database commands do not need
        from seekserve.engine.errors import EngineError

        if not isinstance(e, EngineError):
            raise
        print(f"seekserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
