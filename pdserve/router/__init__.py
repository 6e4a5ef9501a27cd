"""The router: one OpenAI front that picks a prefill and a decode instance (or one colocated instance).

    app.py          the FastAPI app: endpoints, auth, JSON check, OpenAI-shaped errors, /health, serving
    proxy.py        choosing instances, opening upstream requests, retries
    relay.py        relaying a stream: events held back until the first token, resumed when its instance fails
    resume.py       what a stream has delivered (token ids from `id:` lines), the `resume` field it becomes
    sse.py          reading and writing server-sent events
    errors.py       the errors the router answers itself, in OpenAI's shape
    instances.py    the instances, their health, role, kv address and load, and the poller that keeps them
    membership.py   instances joining and leaving while serving: dns:// names, --registry (pdserve/registry)
    policies.py     round_robin, least_loaded, power_of_two, cache_aware: which instance takes a request
    prefix_index.py prompt prefixes (chained chunk hashes) -> the instance that served them last
    metrics.py      the router's Prometheus metrics (its own registry), KV-transfer totals from instances
    cli_commands.py `pdserve router ...`

The router never looks inside a completion; it validates only that the body is a JSON object.
"""
