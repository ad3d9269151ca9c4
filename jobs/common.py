"""Parsing helpers shared by the job entry modules."""

from __future__ import annotations

import argparse
import json


def int_list(text: str) -> list[int]:
    """Parse '12,18,24' into [12, 18, 24]."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 12,18,24, got {text!r}") from None


def float_list(text: str) -> list[float]:
    """Parse '0.3,0.3,0.4' into [0.3, 0.3, 0.4]."""
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.3,0.3,0.4, got {text!r}") from None


def json_object(text: str) -> dict:
    """Parse a JSON object given on the command line (e.g. --storage-options '{"anon": true}')."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): pass an object like '{{\"anon\": true}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object like '{\"anon\": true}'")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description's line breaks."""
