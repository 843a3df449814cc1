"""Shared pieces of the export command lines (``export/to_onnx.py``, ``to_trt.py``, ``to_triton.py``, …)."""
from __future__ import annotations

import argparse


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of a tool's docstring ``doc`` and whose epilog is the
    rest, shown as written."""
    head, rest = doc.split("\n\n", 1)
    return argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
