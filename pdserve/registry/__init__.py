"""How the instances of a cluster find each other: static URLs, DNS names, a Redis registry.

    member.py          one instance as the registry knows it (`Member`), validated from untrusted bytes
    membership.py      the `Membership` interface the router's instance table follows; static URLs
    dns.py             `dns://NAME:PORT`: every address of a name, re-resolved every few seconds
    redis_keys.py      the Redis URL and key layout shared by both sides
    redis_registry.py  an instance's registration: a key with a TTL, refreshed, removed on exit
    watch.py           the router's view of the Redis registry
    limits.py          backoff and rate-limited logging for a registry that is down

This package knows nothing of the router, the server or the engine: they use it, never the reverse.
"""
