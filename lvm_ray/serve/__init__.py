"""Ray Serve: the hybrid Phase-2 / Phase-3 service. config.py (typed args and user_configs),
models.py (model and encoder deployments), router.py (the FastAPI ingress), app.py (build_app),
deploy.py (`lvm serve`), and the Ray-free pieces they hold: routing.py (policy), sessions.py
(signed state tokens), schemas.py (request checks). docs/serve.md explains it.
"""
