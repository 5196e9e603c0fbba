"""The reference model's log-probs of each preference pair, computed once per model and pair and kept on disk.

IPO needs log pi_ref(y|x) of every pair it trains on. TRL computes them before training
(`precompute_ref_log_probs`), but afresh for every trainer and for every pair of the dataset it is given. The
reference is the base model with the edit off, the same for every edit, so every run of a sweep, every draw of a
multi-edit run and every stage of a study recomputes the same numbers. Here each pair's two values are kept in
`$LOCEDIT_CACHE/ref_logps/<model key>.safetensors`, keyed by the pair's token ids; a trainer computes (through
TRL's own precompute) only the pairs not there yet.

The model key is a hash of the base model's weights (the edit's own parameters left out, so a PEFT-wrapped model
and the same model with an EditBank share it), its dtype, the device type and the truncation settings: anything
that changes the numbers changes the file. Each entry carries a checksum of its key and its two values: an entry
whose values were overwritten, or that is not finite, is computed again with a notice, never trusted (as is a file
that does not read, or one written before entries had checksums).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.cache import cache_root
from ..core.files import atomic_path

# Parameter names of an edit (PEFT's lora_A/lora_B, the multi-edit bank), left out of the model key.
EDIT_PARAMETER = re.compile(r"(^|\.)(lora_[A-Za-z_]+|locedit_bank)(\.|$)")
KEY_BYTES = 16
CHECK_BYTES = 8


def entry_check(key: bytes, chosen: float, rejected: float) -> bytes:
    """An entry's checksum: a hash of its key and its two float32 values."""
    values = torch.tensor([chosen, rejected], dtype=torch.float32).numpy().tobytes()
    return hashlib.sha256(key + values).digest()[:CHECK_BYTES]


def base_weights_digest(model: torch.nn.Module) -> str:
    """A hash of the base model's weights under their plain names (`base_model.model.` and `.base_layer` removed),
    the edit's parameters left out."""
    digest = hashlib.sha256()
    entries = {}
    for name, tensor in model.state_dict().items():
        if EDIT_PARAMETER.search(name):
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        entries[plain] = tensor
    for name in sorted(entries):
        tensor = entries[name].detach().cpu()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


# The recipe's switches of how pairs are scored (`LocEditConfig`, `locedit.training.pair_logps`).
SCORING_SWITCHES = ("score_completions_only", "share_prompt", "frozen_prefix", "pack_sequences")


def reference_model_key(model: torch.nn.Module, args) -> str:
    """The cache key of a reference model's log-probs: its weights and what the numbers depend on besides."""
    import trl

    device = next(model.parameters()).device.type
    settings = {
        "weights": base_weights_digest(model),
        "device": device,
        "max_length": getattr(args, "max_length", None),
        "truncation_mode": getattr(args, "truncation_mode", None),
        "use_logits_to_keep": getattr(args, "use_logits_to_keep", None),
        # How the pairs are scored: exact either way, but equal only to float tolerance.
        "scoring": {name: getattr(args, name, None) for name in SCORING_SWITCHES},
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "trl": trl.__version__,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def pair_key(prompt_ids, chosen_ids, rejected_ids) -> bytes:
    """A pair's key: a hash of its three token-id sequences."""
    blob = json.dumps([list(prompt_ids), list(chosen_ids), list(rejected_ids)], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).digest()[:KEY_BYTES]


class ReferenceLogpCache:
    """One model's cached reference log-probs: pair key -> (chosen, rejected)."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def for_model(cls, model_key: str) -> ReferenceLogpCache:
        return cls(os.path.join(cache_root(), "ref_logps", f"{model_key}.safetensors"))

    def read(self, notice: bool = False) -> dict[bytes, tuple[float, float]]:
        """The entries whose checksum holds and whose values are finite; with `notice`, say how many were not."""
        if not os.path.isfile(self.path):
            return {}
        try:
            tensors = load_file(self.path)
            keys, checks = tensors["keys"].numpy(), tensors["checks"].numpy()
            chosen, rejected = tensors["chosen"].tolist(), tensors["rejected"].tolist()
        except (SafetensorError, OSError, KeyError) as err:
            if notice:  # recomputed, not trusted
                print(f"locedit: the reference log-prob cache '{self.path}' does not read ({err}); computing again")
            return {}
        entries, damaged = {}, 0
        for key, check, c, r in zip(keys, checks, chosen, rejected, strict=True):
            key = bytes(key)
            if bytes(check) == entry_check(key, c, r) and math.isfinite(c) and math.isfinite(r):
                entries[key] = (c, r)
            else:
                damaged += 1
        if damaged and notice:
            print(
                f"locedit: {damaged} entries of the reference log-prob cache '{self.path}' fail their checksum "
                "(overwritten or damaged); they are computed again"
            )
        return entries

    def add(self, values: dict[bytes, tuple[float, float]]) -> None:
        """Add values to the file (merged with what another process may have written meanwhile), atomically."""
        merged = {**self.read(), **values}
        keys = list(merged)
        checks = b"".join(entry_check(key, *merged[key]) for key in keys)
        tensors = {
            "keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(len(keys), KEY_BYTES),
            "checks": torch.frombuffer(bytearray(checks), dtype=torch.uint8).view(len(keys), CHECK_BYTES),
            "chosen": torch.tensor([merged[key][0] for key in keys], dtype=torch.float32),
            "rejected": torch.tensor([merged[key][1] for key in keys], dtype=torch.float32),
        }
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with atomic_path(self.path) as tmp:
            save_file(tensors, tmp)


class CachedReferenceMixin:
    """For a DPOTrainer subclass: `_precompute_ref_logps` (TRL's) runs only for the pairs not in the cache.

    Set `cache_ref_log_probs: false` in the recipe to compute every pair afresh, as TRL does.
    """

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names):
            return dataset  # scored already (the training pairs, scored again after training)
        if not getattr(self.args, "cache_ref_log_probs", False) or len(dataset) == 0:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        from .. import processes

        if getattr(self, "_locedit_reference_cache", None) is None:
            self._locedit_reference_cache = ReferenceLogpCache.for_model(reference_model_key(self.model, self.args))
        cache = self._locedit_reference_cache
        keys = [
            pair_key(*row)
            for row in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
        ]
        state = processes.state()
        known = cache.read(notice=state.is_main_process)
        missing = sorted({i for i, key in enumerate(keys) if key not in known})
        if state.is_main_process:
            print(
                f"locedit: reference log-probs of the {name} pairs: {len(keys) - len(missing)} of {len(keys)} "
                f"from the cache, {len(missing)} to compute",
                flush=True,
            )
        if missing:
            scored = self._score_references(dataset.select(missing), name, batch_size)
            new = {keys[i]: pair for i, pair in zip(missing, scored, strict=True)}
            if state.is_main_process:
                cache.add(new)
            known.update(new)
        state.wait_for_everyone()
        dataset = dataset.add_column("ref_chosen_logps", [known[key][0] for key in keys])
        return dataset.add_column("ref_rejected_logps", [known[key][1] for key in keys])

    def _score_references(self, dataset, name: str, batch_size: int) -> list[tuple[float, float]]:
        """(chosen, rejected) reference log-probs of each pair: TRL's precompute in one process; under a launch,
        each process scores its share of the same batches, gathered in order. (TRL hands its results between the
        processes through a file in `datasets`' temporary directory, which is each process's own for an in-memory
        data set such as locedit's: the other processes cannot open it.)"""
        import torch

        from .. import processes

        if processes.state().num_processes == 1:
            computed = super()._precompute_ref_logps(dataset, name, batch_size)
            return list(zip(computed["ref_chosen_logps"], computed["ref_rejected_logps"], strict=True))
        model = self.ref_model or self.model
        device = self.accelerator.device
        mine = []
        for position, start in processes.share(range(0, len(dataset), batch_size)):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.data_collator(rows).items()}
            with torch.no_grad():
                chosen, rejected = self.compute_ref_log_probs(model, batch)
            mine.append((position, list(zip(chosen.cpu().tolist(), rejected.cpu().tolist(), strict=True))))
        return [pair for part in processes.gather(mine) for pair in part]


__all__ = [
    "CachedReferenceMixin",
    "ReferenceLogpCache",
    "base_weights_digest",
    "pair_key",
    "reference_model_key",
]
