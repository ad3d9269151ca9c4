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


def positive_int(text: str) -> int:
    """Parse a whole number of at least 1 (a batch size, a count of actors or tasks)."""
    return _bounded_int(text, 1)


def nonnegative_int(text: str) -> int:
    """Parse a whole number of at least 0 (a count of retries)."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least {low}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """Parse a number above 0 (a timeout in seconds)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value != value:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value
