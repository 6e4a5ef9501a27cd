"""deploy/grafana/pdserve-dashboard.json: every PromQL query in it parses and names only series that
pdserve exports, and every SLO bucket it reads (`le="..."`) is a bucket the histogram has. What pdserve
exports is read from a real scrape of the shared `server` and from the router's own registry, not
from a list kept here."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from pdserve.router.metrics import RouterMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pdserve-dashboard.json"
FUNCTIONS = {"histogram_quantile", "sum", "rate", "irate", "increase", "avg", "max", "min", "count", "topk"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
TOKEN = re.compile(
    r'\s*(?:(?P<string>"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\')|(?P<range>\[[^\]]+\])'
    r"|(?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"|(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},]))"
)
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
SUFFIXES["info"] = ("_info",)


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr.rstrip()):
        m = TOKEN.match(expr, pos)
        assert m is not None and m.end() > pos, f"cannot parse {expr[pos:]!r} in {expr!r}"
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def selectors(expr: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Each series selector of a PromQL expression: its metric name and its `=` label matchers."""
    toks = tokens(expr)
    depth = {"(": 0, "{": 0}
    label_list = False
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text in "({":
            depth[text] += 1
        elif text in ")}":
            depth["(" if text == ")" else "{"] -= 1
            assert min(depth.values()) >= 0, f"unbalanced {text!r} in {expr!r}"
            label_list = False if text == ")" else label_list
        elif kind == "name" and not depth["{"] and not label_list:
            if text in LABEL_LISTS:
                label_list = True
            elif nxt == "(" or text in FUNCTIONS:  # `sum by (le) (...)`: the function comes first
                assert text in FUNCTIONS, f"unknown function {text} in {expr!r}"
            elif text not in KEYWORDS:
                labels, i = _matchers(toks, i + 1)
                yield text, labels
                continue
        i += 1
    assert depth == {"(": 0, "{": 0}, f"unbalanced brackets in {expr!r}"


def _matchers(toks: list[tuple[str, str]], i: int) -> tuple[dict[str, str], int]:
    labels: dict[str, str] = {}
    if i < len(toks) and toks[i][1] == "{":
        i += 1
        while toks[i][1] != "}":
            name, op, value = toks[i][1], toks[i + 1][1], toks[i + 2]
            assert value[0] == "string", f"label {name} has no string value"
            if op == "=":
                labels[name] = value[1][1:-1]
            i += 4 if toks[i + 3][1] == "," else 3
        i += 1
    return labels, i


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":  # label_values(METRIC, LABEL)
            m = re.fullmatch(r"label_values\((.+), *(\w+)\)", var["query"]["query"])
            assert m is not None, var
            exprs.append(m.group(1))
    return exprs


def exported(families: Iterable[Metric]) -> dict[str, set[str]]:
    """Series name -> the `le` bounds it has (histogram buckets), for every family."""
    names: dict[str, set[str]] = {}
    for f in families:
        for suffix in SUFFIXES.get(f.type, ("",)):
            names.setdefault(f.name + suffix, set())
        for s in f.samples:
            names.setdefault(s.name, set()).update([s.labels["le"]] if "le" in s.labels else [])
    return names


@pytest.fixture(scope="module")
def pdserve_series(server: Any) -> dict[str, set[str]]:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=30).text
    names = exported(text_string_to_metric_families(text))
    for name, bounds in exported(RouterMetrics().registry.collect()).items():
        names.setdefault(name, set()).update(bounds)
    return names


def test_every_query_names_an_exported_series(pdserve_series: dict[str, set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for expr in queries(dashboard):
        found = list(selectors(expr))
        assert found, f"no series in {expr!r}"
        for name, labels in found:
            assert name in pdserve_series, f"{name} (in {expr!r}) is not a series pdserve exports"
            if "le" in labels:
                assert labels["le"] in pdserve_series[name], f"{name} has no bucket le={labels['le']}"
            used.add(name)
    needed = ("time_to_first_token", "time_per_output_token", "kv_transfer_bytes", "kv_transfer_seconds")
    needed += ("prefix_cache_hits", "queue_length", "request_prefill_time", "request_decode_time")
    for part in needed:
        assert any(part in name for name in used), f"no panel reads a {part} series"


def test_the_checker_catches_what_it_is_for(pdserve_series: dict[str, set[str]]) -> None:
    """A name pdserve does not export, an unknown function and a missing bucket are all caught."""
    ((name, labels),) = selectors('sum(rate(pdserve_requests_total{outcome="stop",le="9"}[5m]))')
    assert (name, labels) == ("pdserve_requests_total", {"outcome": "stop", "le": "9"})
    assert "pdserve_request_total" not in pdserve_series  # a typo of the real one
    assert "9" not in pdserve_series["pdserve_time_to_first_token_seconds_bucket"]
    with pytest.raises(AssertionError, match="unknown function"):
        list(selectors("sun(rate(pdserve_requests_total[5m]))"))
    with pytest.raises(AssertionError, match="unbalanced"):
        list(selectors("sum(rate(pdserve_requests_total[5m])"))
