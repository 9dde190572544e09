"""`splitserve` command line."""

from __future__ import annotations

import logging
import sys

import click

from splitserve.errors import SplitserveError


@click.group()
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(log_level: str) -> None:
    """splitserve: disaggregated LLM inference (prefill and decode on separate workers)."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--max-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.7, show_default=True, type=float)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--seed", default=None, type=int, help="Same seed, same output.")
@click.option("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M).")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16"]))
def generate(prompt: str, chat: bool, max_tokens: int, temperature: float, top_p: float,
             top_k: int, seed: int | None, model: str | None, dtype: str) -> None:
    """Generate text in this process and stream it to stdout."""
    from splitserve.config.schema import EngineConfig
    from splitserve.engine.llm_engine import Engine
    from splitserve.engine.sampling import SamplingParams

    try:
        engine = Engine.from_config(EngineConfig(model=model, dtype=dtype))  # type: ignore[arg-type]
        text = prompt
        if chat:
            text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed)
        for out in engine.stream("cli", engine.tokenizer.encode(text), params):
            click.echo(out.text_delta, nl=False)
            sys.stdout.flush()
        click.echo()
    except SplitserveError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def model() -> None:
    """Model inspection."""


@model.command("info")
@click.option("--model", "source", default=None, help="GGUF file or HF directory.")
@click.option("--page-size", default=16, show_default=True, type=int)
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16"]))
def model_info(source: str | None, page_size: int, dtype: str) -> None:
    """Architecture, parameter count, KV bytes per token and per page."""
    from splitserve.engine.kv_pool import PageGeometry, dtype_from_name
    from splitserve.model.loader import load_model

    try:
        loaded = load_model(source, dtype_from_name(dtype))
    except SplitserveError as exc:
        raise click.ClickException(str(exc)) from exc
    c = loaded.config
    geo = PageGeometry(page_size, c.num_layers, c.num_kv_heads, c.head_dim, dtype_from_name(dtype))
    rows = [
        ("source", loaded.source),
        ("fingerprint", loaded.fingerprint),
        ("architecture", "llama"),
        ("layers", c.num_layers),
        ("hidden size", c.hidden_size),
        ("intermediate size", c.intermediate_size),
        ("attention heads", f"{c.num_heads} (KV heads {c.num_kv_heads}, head dim {c.head_dim})"),
        ("vocab size", c.vocab_size),
        ("context length", c.max_position_embeddings),
        ("rope", f"theta {c.rope_theta:g}, scaling {c.rope_scaling.kind}"),
        ("tied embeddings", c.tie_word_embeddings),
        ("parameters", f"{c.num_params:,} ({c.num_params / 1e6:.1f}M)"),
        ("KV dtype", dtype),
        ("KV bytes per token", f"{geo.bytes_per_token:,}"),
        (f"KV bytes per page ({page_size} tokens)", f"{geo.bytes_per_page:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
