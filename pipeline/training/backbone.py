"""Writing a backbone fine-tuned by ``icar train-exits --finetune-backbone`` as a model directory ``--model`` loads.

It is a NEW model (new weights, new model key): its directory holds the weights, the open_clip config and the
tokenizer file the original used, and records which model it was fine-tuned from.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors.torch import save

from pipeline.io import storage
from pipeline.model.models import DEMO_CONFIG, DEMO_WEIGHTS, weights_sha256
from pipeline.training.exit_config import BACKBONE_DIR, ExitTrainConfig, TrainExitsError, write_output

log = logging.getLogger(__name__)


def write_backbone(bundle, key: str, cfg: ExitTrainConfig) -> dict:
    """Write the fine-tuned CLIP of ``bundle`` as a model directory under cfg.output; return its identity (a new
    model key). ``key``: the model key of the model it was fine-tuned from."""
    model = bundle.model
    directory = storage.join(cfg.output, BACKBONE_DIR)
    if "://" not in directory:
        directory = os.path.abspath(directory)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    source = bundle.config_doc or {}
    doc = {"model_name": f"{source.get('model_name') or bundle.identity['name']}-icar-finetuned",
           "model_cfg": _model_cfg_of(bundle),
           "preprocess_cfg": {**source.get("preprocess_cfg", {}), "mean": list(bundle.mean),
                              "std": list(bundle.std)},
           "finetuned_from": key}
    tokenizer = source.get("tokenizer")
    if tokenizer:  # e.g. the demo's cut-down BPE file: copy it next to the new weights
        doc["tokenizer"] = tokenizer
        rel = tokenizer.get("bpe_path") or tokenizer.get("name")
        if rel and not os.path.isabs(rel) and bundle.source_dir \
                and os.path.isfile(os.path.join(bundle.source_dir, rel)):
            with open(os.path.join(bundle.source_dir, rel), "rb") as f:
                write_output(storage.join(directory, rel), f.read(), cfg)
    write_output(storage.join(directory, DEMO_WEIGHTS), save(state), cfg)
    write_output(storage.join(directory, DEMO_CONFIG), json.dumps(doc, indent=1).encode(), cfg)
    identity = {"name": doc["model_name"], "pretrained": directory, "weights_sha256": weights_sha256(model),
                "embed_dim": bundle.embed_dim, "image_size": bundle.image_size, "num_blocks": bundle.num_blocks,
                "finetuned_from": key}
    log.warning("fine-tuned backbone written to %s: it is a NEW model (%s…); embed with --model %s and "
                "re-embed anything made with the original before indexing them together", directory,
                identity["weights_sha256"][:16], directory)
    return identity


def _model_cfg_of(bundle) -> dict:
    """Return the open_clip model cfg dict of ``bundle``'s architecture."""
    import open_clip  # lazy: only to save a fine-tuned open_clip backbone; importing it takes seconds

    if bundle.config_doc:
        return bundle.config_doc["model_cfg"]
    if "model_cfg" in bundle.identity:
        return bundle.identity["model_cfg"]
    cfg = open_clip.get_model_config(bundle.identity["name"])
    if cfg is None:
        raise TrainExitsError(f"cannot find the open_clip config of {bundle.identity['name']} to save the backbone")
    return cfg
