"""The web search server: `create_app(engine)` builds the FastAPI app, `serve(engine, host, port)` runs it."""
from clipsearch.server.app import create_app, make_server, serve, serve_in_background

__all__ = ["create_app", "make_server", "serve", "serve_in_background"]
