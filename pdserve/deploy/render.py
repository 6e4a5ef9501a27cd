"""Writing manifests: YAML documents (or JSON) behind a header of comments.

The header says how the file was made (the exact `pdserve deploy` command, so it can be made again
and compared) and what the operator must create first: the Secret, which no generated file holds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import yaml

from pdserve.deploy.common import API_KEY_KEY, SECRET_KEY_FILE, Layout


def secret_instructions(layout: Layout) -> list[str]:
    """How to create the Secret the manifests mount (values never go in a manifest)."""
    api_key = f" --from-file={API_KEY_KEY}=./{API_KEY_KEY}" if layout.api_key else ""
    return [
        "Create the Secret first (a random cluster secret; the API key clients send, without a newline):",
        "  head -c 32 /dev/urandom | base64 > cluster-secret",
        *([f"  printf %s YOUR-API-KEY > {API_KEY_KEY}"] if layout.api_key else []),
        f"  kubectl create secret generic {layout.secret_name()} "
        f"--from-file={SECRET_KEY_FILE}=./{SECRET_KEY_FILE}{api_key}",
    ]


def comments(lines: Sequence[str]) -> str:
    return "".join(f"# {line}\n".replace("# \n", "#\n") for line in lines)


def yaml_documents(header: Sequence[str], docs: Sequence[dict[str, Any]]) -> str:
    body = yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=110)
    return comments(header) + "---\n" + body


def json_document(doc: Any) -> str:
    return json.dumps(doc, indent=2) + "\n"
