"""Ray Serve text-to-video endpoint: ``serve.app:build_app`` (builder), ``serve/config.yaml``.

Modules: ``app`` (deployments + builder), ``api`` (FastAPI routes), ``schemas`` (bodies),
``limits`` (request checks from the config), ``batching`` (same-shape grouping),
``static/index.html`` (the web page at ``/``).
"""
