"""`moejax serve`: an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn).

    protocol.py     the request bodies (pydantic, strict types) and their SamplingParams
    engine_loop.py  the engine on its own thread: requests in through a queue, token deltas out to
                    asyncio; 429 when full, aborts, engine faults; multi-host followers
    text.py         incremental detokenization, stop strings, logprobs as the API shapes them
    app.py          the routes: /v1/completions, /v1/chat/completions (SSE streaming), /v1/models,
                    /health, /metrics, and OpenAI-style errors
    metrics.py      Prometheus metrics of the server and the engine
"""

from moejax.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
