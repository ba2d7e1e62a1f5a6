"""Ray Serve: the hybrid Phase-2 / Phase-3 router, model and encoder deployments (app.py), and the
Ray-free pieces they hold: routing policy (routing.py), session tokens (sessions.py), request
schemas (schemas.py). `serve run serve_configs/hybrid.yaml` deploys it; docs/serve.md explains it.
"""
