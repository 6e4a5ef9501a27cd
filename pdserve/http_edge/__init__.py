"""The HTTP edge an instance and the router share: what every request meets before a route sees it.

    limits.py       the defaults: request body size, chat messages, the server's keep-alive
    errors.py       OpenAI's error body, for answers given outside the apps' own error handlers
    auth.py         the API key (Authorization: Bearer KEY) on every route but /health
    body_limit.py   413 for a body over the limit, from Content-Length or while it streams in
    slashes.py      a trailing slash serves the same route (no 307 redirect)
    access_log.py   health/info/metrics polls out of the access log
    uvicorn_setup.py the uvicorn server both fronts run: its protocol, keep-alive, access log
    httptools_front.py its HTTP protocol (llhttp): malformed HTTP answered in OpenAI's shape, the head limit
    h11_front.py    the same on h11, where httptools is not importable
    refusal.py      the answer to refused HTTP (400, 431) and the lingering close after it

It knows nothing of the engine, the instances' routes or the router's; both fronts import it.
"""
