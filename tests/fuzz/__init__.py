"""Fuzz tests (hypothesis): the HTTP API and the KV control protocol, with generated input.

Hypothesis keeps no example database here (every test sets database=None) and its other files go to
the temporary directory, not into the repository.
"""

import tempfile
from pathlib import Path

from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "pdserve-hypothesis")
