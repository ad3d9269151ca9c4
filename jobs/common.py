"""Parsing helpers shared by the job entry modules, and the argument groups every job speaks the same way.

One CLI grammar: a flag means one thing in every job that has it. The groups:

- model (``add_model_args``): --model, --pretrained, --exits, --heads, --seed, --merge (embed, calibrate,
  train-exits);
- runtime (``add_runtime_args``): --device {auto,cpu,cuda,cuda:N} with one default (``DEVICE_DEFAULT``), --threads
  where a job computes on CPU, --address where it uses Ray;
- storage (``add_storage_args``): --storage-options;
- logging (``add_logging_args``): --no-progress and --log-format {text,json} in every job.

Old spellings of a renamed flag stay as hidden aliases (``add_deprecated_alias``) that print one warning line,
so scheduled jobs keep working.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.logs import setup_logging
from pipeline.model.spec import parse_merge
from pipeline.runtime import PRECISIONS, parse_device

# The one default of --device in every job: CUDA when torch sees a GPU, else the CPU.
DEVICE_DEFAULT = "auto"


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
    """Shows a flag's default once, and only when it says something; keeps the description's line breaks.

    No "(default: None)" or "(default: False)" noise (an unset option or an off switch), and none when the help
    text already explains its default ("default: per model").
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS \
            or (isinstance(action.default, (list, dict)) and not action.default)
        if unset or "(default" in text or "default:" in text:
            return text
        return super()._get_help_string(action)


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


def device(text: str) -> str:
    """Parse a --device value: auto, cpu, cuda or cuda:N."""
    try:
        return parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a renamed flag: stores into the new flag's dest and says once which name to use."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(group, old: str, new: str, dest: str, **kwargs) -> None:
    """Accept ``old`` (hidden from --help) as ``new``: the same dest, type and choices, plus a one-line warning."""
    group.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS,
                       default=argparse.SUPPRESS, **kwargs)


def add_model_args(p: argparse.ArgumentParser, defaults, *, title: str = "model", seed: bool = True,
                   heads: bool = True, merge: str | None = None) -> argparse._ArgumentGroup:
    """Add the model group (--model, --pretrained, --seed, --exits, --heads, --merge); return it for job extras.

    ``defaults``: an object with the job's defaults as attributes (ModelSpec, ExitTrainConfig). ``merge``: the help
    of --merge (a token-merging schedule), for the jobs that take one.
    """
    g = p.add_argument_group(title)
    g.add_argument("--model", default=defaults.model,
                   help="open_clip model name (ViT-B-32, ViT-L-14, ...), 'demo' for the shipped demo model, or a "
                        "model directory")
    g.add_argument("--pretrained", default=defaults.pretrained,
                   help="open_clip pretrained tag, local checkpoint (.safetensors/.pt), or 'none' for a seeded random "
                        "init (default: the model's own)")
    if seed:
        g.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random init with --pretrained none")
    g.add_argument("--exits", type=int_list, default=defaults.exits,
                   help="exit depths in blocks, the last = full depth, e.g. 12,18,24 (default: per model)")
    if heads:
        g.add_argument("--heads", default=defaults.heads,
                       help="exit heads (.safetensors from `icar train-exits`; default: the demo's shipped heads, "
                            "else the tower's own projection)")
    if merge is not None:
        g.add_argument("--merge", type=merge_schedule, default=defaults.merge, metavar="SCHEDULE", help=merge)
    return g


def merge_schedule(text: str) -> str | None:
    """Parse a token-merging schedule (r4, keep0.8, ...:noprop; none) into its canonical spec, None for none."""
    try:
        schedule = parse_merge(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return schedule.spec if schedule is not None else None


def add_runtime_args(p: argparse.ArgumentParser, *, device_help: str | None = None, threads_help: str | None = None,
                     address_help: str | None = None, threads_dest: str = "threads", threads_default=None,
                     title: str = "runtime", device_default: str | None = DEVICE_DEFAULT,
                     precision_default: str | None = None) -> argparse._ArgumentGroup:
    """Add the runtime group: --device (one default everywhere), --threads, --address; each only when its help is
    given (the job uses it), and --precision when ``precision_default`` is (the job's config default). Return the
    group, for job-specific execution flags. ``device_default=None`` is for a job whose config file holds the device
    (the flag then overrides it only when given)."""
    g = p.add_argument_group(title)
    if device_help is not None:
        default_text = (f" (default: {DEVICE_DEFAULT}, CUDA when torch sees a GPU, else the CPU"
                        + ("" if device_default is not None else ", unless the config names one") + ")")
        g.add_argument("--device", type=device, default=device_default, metavar="{auto,cpu,cuda,cuda:N}",
                       help=device_help + default_text)
    if threads_help is not None:
        g.add_argument("--threads", dest=threads_dest, type=positive_int, default=threads_default, metavar="N",
                       help=threads_help)
    if address_help is not None:
        g.add_argument("--address", default=None, help=address_help)
    if precision_default is not None:
        g.add_argument("--precision", default=precision_default, choices=PRECISIONS,
                       help="what the model computes in: auto = bf16 where the hardware computes it natively (CPUs "
                            "with avx512_bf16 or amx_bf16, e.g. AMD Zen 4+, Intel Sapphire Rapids+; GPUs with bf16), "
                            "else fp32. On a CPU the weights are cast (ViT-B-32 on an AMD EPYC with avx512_bf16: "
                            "1.6-1.7x the images/s of fp32, embeddings at cosine >= 0.9999); on a GPU it is autocast")
    return g


def add_storage_args(p: argparse.ArgumentParser, default: dict | None = None) -> argparse._ArgumentGroup:
    """Add the storage group: --storage-options (fsspec options as JSON, for remote paths)."""
    g = p.add_argument_group("storage")
    g.add_argument("--storage-options", type=json_object, default=dict(default or {}),
                   help="fsspec storage options as JSON for remote paths, e.g. '{\"anon\": true}' (never logged)")
    return g


def add_logging_args(p: argparse.ArgumentParser, progress_help: str = "no progress bars") -> argparse._ArgumentGroup:
    """Add the logging group: --no-progress and --log-format."""
    g = p.add_argument_group("logging")
    g.add_argument("--no-progress", action="store_true", help=progress_help)
    g.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="log lines as text for people or one JSON object per line for schedulers "
                        "(default: $ICAR_LOG_FORMAT, else text)")
    return g


def apply_logging(args: argparse.Namespace) -> None:
    """Make --log-format take effect: set what setup_logging reads ($ICAR_LOG_FORMAT) and set
    logging up again. Without the flag, logging stays as the caller set it up."""
    if getattr(args, "log_format", None):
        os.environ["ICAR_LOG_FORMAT"] = args.log_format
        setup_logging()


def set_torch_threads(threads: int | None) -> None:
    """Give torch ``threads`` intra-op threads in this process (None: leave torch's choice)."""
    if threads:
        import torch  # lazy: jobs that never compute (--help, refusals) do not pay torch's import

        torch.set_num_threads(threads)
