"""``gemma4-mlx serve``: the OpenAI-compatible HTTP server (gemma4_mlx/server.py)."""

from __future__ import annotations

import math
import sys
from typing import Optional

import typer

from . import app, user_errors
from .generate import NUM_DRAFT_OPT, STRICT_MEMORY_OPT


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


@app.command()
def serve(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder or Hugging Face repo id (owner/name): "
                                                       "the only model this server ever loads."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. The default answers this machine only; "
                                                        "there is no authentication."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port, printed at start)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="The model id clients see in /v1/models and responses "
                                                         "(default: the folder name or repo id)."),
    adapter_path: Optional[str] = typer.Option(None, "--adapter-path",
                                               help="mlx-lm LoRA/DoRA adapter folder (adapter_config.json + "
                                                    "adapters.safetensors) applied at start."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Tokens generated when a request gives no max_tokens "
                                                            "(cut to what fits the context)."),
    max_tokens_limit: Optional[int] = typer.Option(None, "--max-tokens-limit",
                                                   help="Largest max_tokens a request may ask for "
                                                        "(default: the model's context)."),
    max_prompt_tokens: int = typer.Option(16384, "--max-prompt-tokens", help="Longest prompt accepted, in tokens."),
    max_body_bytes: int = typer.Option(4 * 1024 * 1024, "--max-body-bytes", help="Largest request body, in bytes."),
    max_queue: int = typer.Option(8, "--max-queue", help="Requests that may wait while one generates; "
                                                        "beyond that: 503 with Retry-After."),
    max_connections: int = typer.Option(64, "--max-connections", help="Open connections at once; beyond that: 503."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds a client may stall while sending its request "
                                                         "or reading a stream."),
    temp: float = typer.Option(0.0, "--temp", help="Default temperature (0 = greedy) for requests that give none."),
    top_p: float = typer.Option(1.0, "--top-p", help="Default top_p, in (0, 1]."),
    top_k: int = typer.Option(0, "--top-k", help="Default top_k (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Default min_p, in [0, 1]."),
    prefill_step_size: int = typer.Option(2048, "--prefill-step-size",
                                          help="Prompt tokens per prefill step (a cancelled request stops "
                                               "at the next step)."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model",
                                              help="Speculative decoding for every request: a smaller Gemma 4, or "
                                                   "Gemma 4's MTP drafter (a gemma4_assistant checkpoint); folder "
                                                   "or repo id, loaded at start. Greedy replies stay the same."),
    num_draft_tokens: Optional[int] = NUM_DRAFT_OPT,
    strict_memory: bool = STRICT_MEMORY_OPT,
    quiet: bool = typer.Option(False, "--quiet", help="No per-request log lines."),
) -> None:
    """OpenAI-compatible HTTP API for one Gemma 4 model: POST /v1/chat/completions (tools and
    tool_calls included) and /v1/completions (streaming or not), GET /v1/models and /health.
    Thinking is off unless a request turns it on (chat_template_kwargs.enable_thinking or
    reasoning_effort). Under mlx.launch the model is split over the processes and rank 0 serves.
    See docs/usage.md."""
    from ..generation import check_generation_options, check_sampling

    for name, value, lo in (("--max-tokens", max_tokens, 1), ("--max-prompt-tokens", max_prompt_tokens, 1),
                            ("--max-body-bytes", max_body_bytes, 1), ("--max-queue", max_queue, 0),
                            ("--max-connections", max_connections, 1), ("--prefill-step-size", prefill_step_size, 1),
                            ("--max-tokens-limit", max_tokens_limit, 1)):
        if value is not None and value < lo:
            _usage_error(f"{name} must be >= {lo}, got {value}")
    if not 0 <= port <= 65535:
        _usage_error(f"--port must be in 0..65535, got {port}")
    if not (math.isfinite(timeout) and timeout > 0):
        _usage_error(f"--timeout must be a positive number of seconds, got {timeout}")
    for name, value in (("--temp", temp), ("--top-p", top_p), ("--min-p", min_p)):
        if not math.isfinite(value):
            _usage_error(f"{name} must be a finite number, got {value}")
    try:
        check_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
        check_generation_options(draft_model=draft_model, num_draft_tokens=num_draft_tokens)
    except ValueError as e:
        _usage_error(str(e))
    if served_model_name is not None and not served_model_name.strip():
        _usage_error("--served-model-name must not be empty")

    from . import debug_enabled

    with user_errors():
        from ..distributed import world
        from ..server import ServerConfig, serve_follower
        from ..server import serve as run_server
        from ..speculative import DEFAULT_NUM_DRAFT_TOKENS

        config = ServerConfig(
            host=host, port=port, model_name=served_model_name, max_body_bytes=max_body_bytes,
            max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit, default_max_tokens=max_tokens,
            temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, max_queue=max_queue,
            max_connections=max_connections, timeout=timeout, prefill_step_size=prefill_step_size, quiet=quiet,
            debug=debug_enabled(), num_draft_tokens=num_draft_tokens or DEFAULT_NUM_DRAFT_TOKENS,
        )
        group = world()  # under mlx.launch every process loads its shard; rank 0 serves, the others follow
        if group is not None and group.rank() != 0:
            code = serve_follower(config, model, adapter_path=adapter_path, strict_memory=strict_memory,
                                  draft_model=draft_model)
        else:
            code = run_server(config, model, adapter_path=adapter_path, strict_memory=strict_memory,
                              draft_model=draft_model, group=group)
    raise typer.Exit(code)
