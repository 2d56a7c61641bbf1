"""Whether a node is a standard ONNX operator: the only ones the passes know how to rewrite."""

from __future__ import annotations

import onnx_ir as ir

# The default domain has two spellings.
ONNX_DOMAINS = ("", "ai.onnx")


def is_onnx(node: ir.Node) -> bool:
    return node.domain in ONNX_DOMAINS
