"""The HTTP server (`fmoe serve`): OpenAI- and Anthropic-compatible endpoints, a chat page, one
engine owner with a bounded queue. Needs the `serve` extra (starlette, uvicorn)."""
